"""GPU probe (not committed): which JIT-path calls crash the process. Each case in a child."""
import subprocess, sys, json
CASE = r'''
import os, sys, torch, fastdiff
from fastdiff import ops, prebuilt
from fastdiff.diffusion import GaussianDiffusion
kind, guided, st, nz = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
prebuilt.set_mode(os.environ.get("PROBE_MODE", "off"))
import os; d = os.environ.get("PROBE_DEV", "cuda")
if kind == "geglu":
    y = ops.geglu(torch.randn(2, 64, 256, device=d, dtype=torch.float16))
elif kind == "gns":
    y = ops.group_norm_silu(torch.randn(2, 64, 8, 8, device=d), 32, torch.ones(64, device=d), torch.zeros(64, device=d))
else:
    table = GaussianDiffusion().step_table("dpmpp_2m" if st else "ddim", 8)
    n = 2
    x = torch.randn(n, 3, 16, 16, device=d)
    g = {"none": None, "true": True, "false": False}[guided]
    mo = torch.randn((2 * n if g in (None, True) else n), 3, 16, 16, device=d)
    state = torch.zeros(max(table.slots, 1), *x.shape, device=d) if st else None
    noise = torch.randn_like(x) if nz else None
    idx = torch.tensor(1, device=d)
    c = table.coeffs.to(d)
    if kind == "direct":
        y = torch.ops.fastdiff._jit_denoise_step(mo, x, c, idx, noise, state, 3.0, False, 1.0, True, g, "")
    else:
        y = ops.denoise_step(mo, x, c, idx, noise, state, 3.0 if g is not False else 1.0, False, 1.0, write_x0=True, guided=g)
torch.cuda.synchronize() if d == "cuda" else None
print("ok")
'''
cases = [("geglu", "none", "0", "0"), ("gns", "none", "0", "0")]
for kind in ("direct", "op"):
    for g in ("none", "true", "false"):
        for st in ("0", "1"):
            for nz in ("0", "1"):
                cases.append((kind, g, st, nz))
import os
from concurrent.futures import ThreadPoolExecutor
def one(c):
    kind, mode = (c[0], "off") if c[0] != "op_on" else ("op", "on")
    env = dict(os.environ, PROBE_MODE=mode)
    try:
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CASE, kind, *c[1:]],
                           capture_output=True, text=True, timeout=150, env=env)
    except subprocess.TimeoutExpired:
        return " ".join(c) + " timeout"
    out = (r.stdout + r.stderr).strip().splitlines()
    tail = [l for l in out if "Error" in l or "error" in l][-1:] or out[-1:] or [""]
    return f"{' '.join(c)} rc {r.returncode} {tail[0][:200]}"
cases += [("op_on",) + c[1:] for c in cases if c[0] == "op"]
with ThreadPoolExecutor(8) as ex:
    for line in ex.map(one, cases):
        print(line, flush=True)
