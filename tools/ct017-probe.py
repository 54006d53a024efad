"""vLLM 0.26 pins compressed-tensors 0.17.0 while llmcompressor 0.14 writes with 0.19.0: load a
checkpoint written by llmcompressor in vLLM with 0.17.0 first on the path, and decode a few tokens.
  PYTHONPATH=<ct-0.17 site>:$PYTHONPATH python tools/ct017-probe.py <checkpoint dir>"""
import json
import sys

if __name__ == "__main__":
    import compressed_tensors
    import vllm
    ckpt = sys.argv[1]
    llm = vllm.LLM(model=ckpt, max_model_len=256, gpu_memory_utilization=0.3, enforce_eager=True)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}],
                       vllm.SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)
    print(json.dumps({"compressed_tensors": compressed_tensors.__version__,
                      "vllm": vllm.__version__, "checkpoint": ckpt,
                      "tokens": list(out[0].outputs[0].token_ids)}))
