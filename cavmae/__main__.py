from cavmae.cli import run

run()
