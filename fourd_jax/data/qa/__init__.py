"""Questions computed from ground-truth geometry: DSR Suite, 4DThinker and MLLM-4D families."""
