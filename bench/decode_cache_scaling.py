"""Decode cost per step against KV-cache length (session 4, issue 13): is a decode step O(cache) beyond attention?

``python bench/decode_cache_scaling.py LAYERS`` truncates the default model to LAYERS decoder layers and, for prompts
of 64 and 1024 random tokens (batch 16, no stop id), prints the process CPU seconds per decode step
``(cpu(18 new tokens) - cpu(2 new tokens)) / 16`` (each measured after one compiling call).
"""
import resource, time, json, sys
import numpy as np, jax, jax.numpy as jnp
from selfaug_jax.models import load_pretrained
from selfaug_jax.models.generation import GenerationConfig, generate
def cpu():
    r=resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime+r.ru_stime
L=int(sys.argv[1]); b=16
m=load_pretrained("smollm2-135m-instruct", num_layers=L)
rng=np.random.default_rng(0)
for t in (64, 1024):
    ids=rng.integers(100,40000,size=(b,t)).astype(np.int32)
    res={}
    for n in (2, 18):
        cfg=GenerationConfig(max_new_tokens=n, eos_token_ids=(), pad_token_id=0, prompt_bucket=t)
        generate(m, ids, cfg)
        c=cpu(); generate(m, ids, cfg); res[n]=cpu()-c
    print(json.dumps({"layers":L,"t":t,"cpu_2":round(res[2],3),"cpu_18":round(res[18],3),"per_step":round((res[18]-res[2])/16,4)}), flush=True)
