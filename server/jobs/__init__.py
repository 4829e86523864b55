"""Fine-tuning jobs: training loop, worker, runner."""
