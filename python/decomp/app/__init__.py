"""The command line, the demo and its report, fine-tuning, and the built-in assets."""
