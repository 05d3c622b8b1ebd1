"""`python -m llmserve ...`: the `llmserve` command."""
from llmserve.cli import main

main()
