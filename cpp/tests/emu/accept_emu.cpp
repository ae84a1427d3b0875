// The kernel source compiled for the CPU emulator (REDRAFTER_EMULATE, see cuda_emu.h).
#include "../../kernels/accept.cu"
