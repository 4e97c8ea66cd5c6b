"""Sample from a trained GPT: python sample.py --ckpt out/shakespeare_char. See nanogpt/generate.py."""

from nanogpt.generate import main

if __name__ == "__main__":
    main()
