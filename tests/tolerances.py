"""Tolerances of the tests that compare two ways of computing the same numbers (modes, chunkings, batch vs solo).

float64 checks the invariant itself: the two ways agree to ~1e-12, so 1e-10 fails on any real disagreement.
float32 only bounds round-off: a change of chunking, batch size or CPU changes the summation order inside the
matmuls (BLAS blocks by shape, and by CPU: AVX2, AVX-512, NEON), each op then differs by a few ulps (eps = 6e-8)
and the TTT inner loop carries those differences from mini-batch to mini-batch through 3 layers and 45+ tokens.
Measured: 3.7e-5 on the final fast weights on an AMD EPYC (1.4e-5 on this CPU's neighbours); the bound
is 1e-4. A real bug (a wrong token offset, a missed update, a leaked state) moves values by 1e-2 or more.
"""

FLOAT64 = {"rtol": 1e-10, "atol": 1e-10}
FLOAT32 = {"rtol": 1e-4, "atol": 1e-4}
# Scores and telemetry are stored as float32 even for a float64 model: two float64 computations then differ by at
# most one float32 rounding (half an ulp, 6e-8 relative).
FLOAT64_STORED = {"rtol": 1e-6, "atol": 1e-7}
