"""Web demo (the Hugging Face Spaces convention): python app.py --ckpt out/shakespeare_char. See nanogpt/app.py."""

from nanogpt.app import main

if __name__ == "__main__":
    main()
