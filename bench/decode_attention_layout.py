"""One decode step's attention (t = 1) against a 1,042-entry KV cache, per layer, in two cache layouts (session 4).

``python bench/decode_attention_layout.py`` prints the CPU milliseconds per call (50 calls after one compiling call)
of the project's ``grouped_query_attention`` on the ``[b, s, kv, hd]`` cache layout the decoder uses, and of the same
arithmetic with the cache stored ``[b, kv, s, hd]`` (batch 16, 9 heads / 3 KV heads, head dim 64, float32).
"""
import time, resource, jax, jax.numpy as jnp, numpy as np
from selfaug_jax.models.attention import grouped_query_attention
def cpu():
    r=resource.getrusage(resource.RUSAGE_SELF); return r.ru_utime+r.ru_stime
b,s,k,g,d=16,1042,3,3,64
q=jnp.ones((b,1,k*g,d)); K=jnp.ones((b,s,k,d)); V=jnp.ones((b,s,k,d)); m=jnp.ones((b,1,s),bool)
f=jax.jit(lambda q,K,V,m: grouped_query_attention(q,K,V,m,512))
Kt=jnp.ones((b,k,s,d)); Vt=jnp.ones((b,k,s,d))
def alt(q,Kt,Vt,m):
    qk=q.reshape(b,1,k,g,d)
    sc=jnp.einsum("btkgd,bksd->bkgts",qk,Kt,preferred_element_type=jnp.float32)/8.0
    sc=jnp.where(m[:,None,None],sc,-1e30); p=jax.nn.softmax(sc,-1)
    return jnp.einsum("bkgts,bksd->btkgd",p,Vt,preferred_element_type=jnp.float32).reshape(b,1,k*g,d)
fa=jax.jit(alt)
for name,fn,args in (("current [b,s,k,d]",f,(q,K,V,m)),("cache [b,k,s,d]",fa,(q,Kt,Vt,m))):
    fn(*args).block_until_ready()
    c=cpu()
    for _ in range(50): fn(*args).block_until_ready()
    print(name, "ms CPU per layer-step:", round((cpu()-c)/50*1000,2))
