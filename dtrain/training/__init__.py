"""The training loop and what only it uses: the Trainer, its runtime, interrupts, resume checks, schedule, certificate, metrics and exit status."""
