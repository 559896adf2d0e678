"""Commands that start from raw videos and end in a model: they compose `preprocess` and `train`, which never
import each other."""
