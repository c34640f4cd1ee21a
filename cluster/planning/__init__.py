"""`dip plan`: per-GPU memory arithmetic of a training config, for every DeepSpeed ZeRO stage.

Two parts, both plain arithmetic (no GPU, no allocation; parameter counts come from a model built on
the `meta` device):

* Model states per GPU (parameters, gradients, optimizer states, EMA, DeepSpeed buffers; the EMA
  is whole on rank 0 under ZeRO-0/1/2 and partitioned like the weights under ZeRO-3). The
  per-parameter byte counts are what DeepSpeed 0.19.8 allocates with our engine config
  (trainer/loop/engine.py: torch AdamW, contiguous gradients, default bucket sizes), measured on CPU with
  two gloo ranks (tests/test_plan_zero_states.py checks them against live tensors).
* Activations per image: every tensor autograd saves for backward, op by op, for the DiP block,
  the Patch Detailer Head (or the linear head) and the loss, in the training dtype. The peak adds
  what backward holds at once (see `ActivationBreakdown.peak`). tests/test_plan_activations.py
  compares the estimate with the bytes of saved tensors and with the RSS peak measured on CPU.

What is not modelled: cuDNN/NCCL workspaces, allocator fragmentation and the CUDA context, all
covered by a flat `reserve` (default 2 GiB), and the sampling activations of rank 0's periodic sample
grids (inference only; under ZeRO-3 the whole EMA gathered for a grid is counted).

A package, not one module: the two estimates (activations.py, memory.py) are each checked against
measurements by their own tests and change for different reasons (a model change vs a DeepSpeed
change), and the text `dip plan` prints (report.py) is a third concern; together they were over the
450-line limit. memory.py's `make_plan` is the one entry point; cluster/cli/plan.py parses the flags.
"""
