"""The engine: the scheduler (scheduler.py: continuous batching, chunked prefill, preemption, background
task time) and everything under it: requests and their endings, sampling and logit controls, the model
runner with its paged KV cache (runner/). Nothing here knows gRPC or HTTP."""
