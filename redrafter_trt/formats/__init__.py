"""What the toolkit reads and writes on disk, above the models it fills: the Hugging Face <->
TensorRT-LLM name table (:mod:`.names`), FP8 base linears (:mod:`.fp8`), Hugging Face import
(:mod:`.hf`), tensor-parallel sharding (:mod:`.sharding`), the ReDrafter checkpoint
(:mod:`.checkpoint`) and the prompt sets (:mod:`.datasets`). The draft heads shipped with the
package, in the same stage, are :mod:`redrafter_trt.heads`."""
