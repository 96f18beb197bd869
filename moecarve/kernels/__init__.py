"""Fast forwards for carved MoE layers, as pure tensor functions (no nn.Module, no transformers).

  tensors.py        MoETensors (a layer's weights) and `route` (the routers' maths, or the
                    module's own router for the others, e.g. "fitted")
  cpu.py            `moe_decode_cpu`: decode and small batches (T <= 64) on CPU
  triton_decode.py  `moe_decode_triton`: fused router + gathered SwiGLU GEMV for GPU decode
                    (imported lazily: it needs triton)

moecarve.modules.fast binds them to CarvedMoE modules (`use_kernels`).
"""

from .cpu import moe_decode_cpu, use_cpu_path
from .tensors import MoETensors, route, router_logits

__all__ = ["MoETensors", "moe_decode_cpu", "route", "router_logits", "use_cpu_path"]
