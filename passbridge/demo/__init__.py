"""The demo and the local stack: start every process passbridge needs and play a realistic day through it."""
