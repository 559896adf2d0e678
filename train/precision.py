"""The number formats of a training step: the autocast it runs under, and bf16 working weights with fp32 masters.

`precision` (pretrain. / finetune.):
  auto   bf16 autocast on CUDA, fp32 on a CPU. Autocast casts every fp32 weight to bf16 on every forward, and its
         LayerNorms return fp32, so the residual stream stays fp32 and is cast again before every matmul.
  bf16   the model's weights ARE bf16 (`WorkingWeights`): working copies kept between steps, refreshed from the fp32
         master weights (the original parameters, which the optimizer updates) by one fused copy per step. No
         autocast: activations, the residual stream and gradients are bf16; LayerNorm, softmax and GELU accumulate
         in fp32 inside their kernels, and the losses are computed in fp32 by the model. On any device.
  fp16   fp16 autocast with the official dynamic loss scale (CUDA).
  fp32   no autocast.
"""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA ('auto', and 'bf16' for an evaluation of a model that may be fp32), fp16 autocast
    ('fp16', the official AMP), or nothing (fp32, and on CPU). A model with bf16 working weights runs correctly under
    it (its weights need no cast); its training step runs without it (`step_autocast`)."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16 if precision == "fp16" else torch.bfloat16)


def step_autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast of a training step: none under 'bf16', whose weights are already bf16."""
    return contextlib.nullcontext() if precision == "bf16" else autocast(device, precision)


class WorkingWeights:
    """bf16 working copies of a model's floating-point parameters; the fp32 originals are the master weights.

    Made after the optimizer is built over the original parameters (so it updates the fp32 masters) and before
    DistributedDataParallel or torch.compile wrap the model: every floating-point parameter of `model` is replaced by
    a bf16 Parameter, frozen ones too, so that no fp32 weight meets a bf16 activation. The model's `state_dict()`
    returns the masters and `load_state_dict()` writes them (module hooks), so checkpoints hold, and a resume
    restores, the exact fp32 weights under the usual keys.

    Per optimizer step: backward (bf16 gradients on the working weights; micro-batches accumulate there, which DDP's
    no_sync requires) -> `grads_to_masters` -> optimizer step on the masters -> `refresh`.
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        self.masters: dict[str, torch.nn.Parameter] = {}  # parameter name -> its fp32 master
        self.pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []  # (working, master)
        working: dict[int, torch.nn.Parameter] = {}
        for module_name, module in model.named_modules():
            for name, param in list(module._parameters.items()):
                if param is None or not param.is_floating_point():
                    continue
                if id(param) not in working:  # a parameter shared by two modules gets one working copy
                    working[id(param)] = torch.nn.Parameter(param.detach().to(dtype),
                                                            requires_grad=param.requires_grad)
                    self.pairs.append((working[id(param)], param))
                module._parameters[name] = working[id(param)]
                self.masters[f"{module_name}.{name}" if module_name else name] = param
        self.trained = [(w, m) for w, m in self.pairs if m.requires_grad]
        masters = self.masters

        def state_dict_hook(module, state_dict, prefix, local_metadata) -> None:
            for name, master in masters.items():
                if prefix + name in state_dict:
                    state_dict[prefix + name] = master.detach()

        @torch.no_grad()
        def load_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
            for name, master in masters.items():  # the load itself then writes the (rounded) working copies
                value = state_dict.get(prefix + name)
                if isinstance(value, torch.Tensor) and value.shape == master.shape:
                    master.copy_(value)

        model.register_state_dict_post_hook(state_dict_hook)
        model.register_load_state_dict_pre_hook(load_hook)

    def grads_to_masters(self) -> None:
        """The working weights' gradients, in fp32, as the masters' gradients (the working ones are released)."""
        for w, m in self.trained:
            if w.grad is not None:
                m.grad = w.grad.float() if m.grad is None else m.grad.add_(w.grad)
                w.grad = None

    @torch.no_grad()
    def refresh(self) -> None:
        """Working weights <- masters, after an optimizer step: one fused (foreach) copy that rounds to bf16."""
        if self.trained:
            torch._foreach_copy_([w for w, _ in self.trained], [m for _, m in self.trained])
