"""Train a GPT: python train.py --config configs/shakespeare_char.yaml [--ckpt_path last]. See nanogpt/training/cli.py."""

from nanogpt.training.cli import main

if __name__ == "__main__":
    main()
