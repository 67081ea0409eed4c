// The CUDA tally kernels, compiled as C++ for the emulated backend.
#include "../cuda/tally_cuda.cu"
