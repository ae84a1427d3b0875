// The GPU self-test compiled for the CPU emulator (REDRAFTER_EMULATE, see cuda_emu.h).
#include "../gpu_kernel_check.cu"
