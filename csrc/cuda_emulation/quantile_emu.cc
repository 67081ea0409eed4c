// The CUDA quantile kernels, compiled as C++ for the emulated backend.
#include "../cuda/quantile_cuda.cu"
