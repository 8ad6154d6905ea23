// Score and output ids shared by the forward and backward kernels and hyptorch_flash/ops/cuda_backend.py,
// cuda_backward.py (torch-free).
#pragma once

namespace hyptorch_flash {

enum ScoreId : int { SCORE_EUCLIDEAN = 0, SCORE_LORENTZ_DOT = 1, SCORE_DISTANCE = 2, SCORE_POINCARE = 3 };
enum OutputId : int { OUTPUT_EUCLIDEAN = 0, OUTPUT_LORENTZ = 1, OUTPUT_KLEIN = 2, OUTPUT_POINCARE = 3 };

}  // namespace hyptorch_flash
