#!/usr/bin/env python3
"""Modelled speed of the quantized-matmul hot loops on Neoverse-V2 (Axion C4A), ours and ggml's.

There is no ARM machine in the dev loop, and qemu says nothing about speed. This compiles the
kernels for aarch64 with the ARM build's own flags plus -DC6_MCA_MODEL (which makes the kernels
emit `# LLVM-MCA-BEGIN/END` comments around one iteration of each hot loop, one region per
instantiation: c6_<i8|i16>_t<ggml type>_m<activation rows>), cuts those regions out of the
assembly and runs `llvm-mca-19 -mcpu=neoverse-v2` on them. llama.cpp's own kernels (ggml-cpu
`arch/arm/quants.c` vec_dot and `arch/arm/repack.cpp` GEMV) are compiled from the llama.cpp
sources vendored in the llama-cpp-python sdist, at run time, with the same compiler: a temporary
preprocessed copy gets the same markers around its block loop (nothing of ggml is kept in this
repository). Without the sdist that column is skipped with a message.

Figures are simulated cycles per 256 weights per activation row ("Total Cycles" / iterations,
normalised), loads taken as L1 hits: compute ceilings. The model does not see DRAM or L2
bandwidth, prefetch, store-to-load stalls or branch mispredictions; decode (M=1) on a real C4A
is usually bandwidth-bound, so measure there with `capibara6 doctor` and
`scripts/bench_engine.py`.

  python scripts/bench_neon_model.py [--types Q4_0,Q4_K,...] [--iterations 100] [--ggml-src DIR|TAR]
                                     [--ggml-types ...] [--download] [--no-ggml] [--json-only]

ggml sources: --ggml-src (an extracted llama-cpp-python sdist, its vendor/llama.cpp, or the
.tar.gz), else $CAPIBARA6_GGML_SRC, else ~/.cache/capibara6/sdist/, else /tmp/lcp/; --download
fetches the sdist there with `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`.
Last line of output: JSON.
"""
import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(REPO, "capibara6", "kernels", "src")
CC = os.environ.get("CC_AARCH64", "aarch64-linux-gnu-gcc")
CXX = os.environ.get("CXX_AARCH64", "aarch64-linux-gnu-g++")
MCA = os.environ.get("LLVM_MCA", "llvm-mca-19")
MCPU = "demeter"  # GCC 12's name for Neoverse-V2 (it rejects -mcpu=neoverse-v2)
LLAMA_CPP_PYTHON = "0.3.36"
CACHE = os.path.expanduser("~/.cache/capibara6/sdist")

# ggml type id, weights of one weight row in one iteration of our marked loops (a block); regions
# c6_<kind>n4_* (M=1, 32-block types) take 4 weight rows per iteration
TYPES = {"Q4_0": (2, 32), "Q5_0": (6, 32), "Q8_0": (8, 32), "Q4_K": (12, 256), "Q5_K": (13, 256), "Q6_K": (14, 256)}
OURS = [("i8", "qmatmul.c"), ("i16", "qmatmul16.c")]

# ggml's loops: (kernel, source, function, loop header regex, weights per iteration, -mcpu).
# vec_dot: the NEON path (SVE off) at nrc=1, two 32-blocks per iteration for the 32-block types.
# as built for V2: what llama.cpp runs at M=1 on Neoverse-V2 (SVE + i8mm): the CPU_REPACK GEMV
# where ggml repacks that type (ggml_repack_get_optimal_repack_type: 4x8 / 8x8 interleaved rows),
# else vec_dot built with SVE on.
_VD_Q0 = r"for \(; ib \+ 1 < nb; ib \+= 2\)"
_VD_K = r"for \(int i = 0; i < nb; \+\+i\)\s*\{"
_GEMV = r"for \(int b = 0; b < nb; b\+\+\)"
GGML_VEC_DOT = {
    "Q4_0": ("quants.c", "ggml_vec_dot_q4_0_q8_0", _VD_Q0, 64),
    "Q5_0": ("quants.c", "ggml_vec_dot_q5_0_q8_0", _VD_Q0, 64),
    "Q8_0": ("quants.c", "ggml_vec_dot_q8_0_q8_0", _VD_Q0, 64),
    "Q4_K": ("quants.c", "ggml_vec_dot_q4_K_q8_K", _VD_K, 256),
    "Q5_K": ("quants.c", "ggml_vec_dot_q5_K_q8_K", _VD_K, 256),
    "Q6_K": ("quants.c", "ggml_vec_dot_q6_K_q8_K", _VD_K, 256),
}
GGML_V2 = {
    "Q4_0": ("repack.cpp", "ggml_gemv_q4_0_4x8_q8_0", _GEMV, 4 * 32),
    "Q5_0": ("quants.c", "ggml_vec_dot_q5_0_q8_0", _VD_Q0, 64),
    "Q8_0": ("repack.cpp", "ggml_gemv_q8_0_4x8_q8_0", _GEMV, 4 * 32),
    "Q4_K": ("repack.cpp", "ggml_gemv_q4_K_8x8_q8_K", _GEMV, 8 * 256),
    "Q5_K": ("repack.cpp", "ggml_gemv_q5_K_8x8_q8_K", _GEMV, 8 * 256),
    "Q6_K": ("repack.cpp", "ggml_gemv_q6_K_8x8_q8_K", _GEMV, 8 * 256),
}
# Loops GCC 12 keeps inside those block loops (the rest it unrolls), in order of appearance in
# the assembly, with their trip counts from the source: Q4_K/Q5_K `sb < QK_K/64` (4) around
# `i < col_pairs` (4); Q6_K `half < 2` around `sb < QK_K/64` (4). The body of each is modelled
# separately and counted that many times; a region whose loop count disagrees is an error.
GGML_TRIPS = {"ggml_gemv_q4_K_8x8_q8_K": (4, 4), "ggml_gemv_q5_K_8x8_q8_K": (4, 4),
              "ggml_gemv_q6_K_8x8_q8_K": (2, 4)}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError("%s failed (%d):\n%s" % (cmd[0], r.returncode, (r.stderr or r.stdout)[-3000:]))
    return r.stdout


def our_flags():
    """The ARM build's compile flags (build_ffi.compile_args for aarch64, -mcpu=demeter as in
    scripts/test_arm.sh), plus the model switch."""
    sys.path.insert(0, os.path.join(REPO, "capibara6", "kernels"))
    env = os.environ.copy()
    os.environ["CAPIBARA6_KERNEL_ARCH_FLAGS"] = "-mcpu=" + MCPU
    os.environ.pop("CAPIBARA6_PORTABLE", None)
    os.environ.pop("CAPIBARA6_FORCE_PORTABLE", None)
    try:
        import build_ffi
        args = build_ffi.compile_args("aarch64")
    finally:
        os.environ.clear()
        os.environ.update(env)
        sys.path.pop(0)
    return [a for a in args if a not in ("-pthread",)] + ["-DC6_MCA_MODEL"]


# ---------------------------------------------------------------- assembly regions
_BEGIN = re.compile(r"#\s*LLVM-MCA-BEGIN\s+(\S+)")
_END = re.compile(r"#\s*LLVM-MCA-END")
_BRANCH = re.compile(r"^(b\.?(eq|ne|cs|hs|cc|lo|mi|pl|vs|vc|hi|ls|ge|lt|gt|le|al)|b|cbz|cbnz|tbz|tbnz)\s")


def regions(asm_text):
    """{name: [instruction lines]} of every marked region (labels, directives, comments dropped)"""
    out, cur, name = {}, None, None
    for raw in asm_text.splitlines():
        line = raw.strip()
        m = _BEGIN.search(line)
        if m:
            name, cur = m.group(1), []
            continue
        if _END.search(line):
            if name is not None and name not in out:
                out[name] = cur
            name, cur = None, None
            continue
        if cur is None or not line or line.startswith(("//", "#", "@")):
            continue
        if line.startswith(".") and not line.endswith(":"):
            continue  # a directive; local labels (.L12:) are kept for the loop structure
        cur.append(line.split("//")[0].strip())
    return out


def mca(regs, iterations):
    """{name: (total cycles per iteration, instructions, branches)} from one llvm-mca run"""
    if not regs:
        return {}
    names = sorted(regs)
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        for n in names:
            f.write("# LLVM-MCA-BEGIN %s\n" % n)
            for ins in regs[n]:
                if ins.endswith(":"):
                    continue
                # a branch's target label is not in the cut-out block: aim it at a local one
                # llvm-mca 19 gives a multi-register `ld1 {..}.8b` a false dependency; the .16b
                # form models the same cost (docs: /work/shared/ARM_TESTING.md)
                if re.match(r"ld1\s*\{", ins) and "-" in ins.split("}")[0] or ins.count(".8b") > 1:
                    ins = re.sub(r"\.8b\b", ".16b", ins) if ins.startswith("ld1") else ins
                # GCC prints some byte immediates sign-extended (movi v0.16b, 0xff..f0)
                m = re.match(r"(movi\s+v\d+\.(?:16|8)b,\s*)(0x[0-9a-f]+)$", ins)
                if m:
                    ins = m.group(1) + hex(int(m.group(2), 16) & 0xFF)
                if _BRANCH.match(ins):
                    ins = re.sub(r"(\.L\w+|\b[A-Za-z_]\w*\+?\d*)$", "1f", ins)
                f.write("\t%s\n" % ins)
            f.write("1:\n# LLVM-MCA-END %s\n" % n)
        path = f.name
    try:
        text = run([MCA, "-mtriple=aarch64", "-mcpu=neoverse-v2", "-iterations=%d" % iterations, path])
    finally:
        os.unlink(path)
    res = {}
    blocks = re.split(r"\n\[\d+\] Code Region - ", "\n" + text)
    for blk in blocks[1:]:
        name = blk.split("\n", 1)[0].strip()
        it = int(re.search(r"Iterations:\s+(\d+)", blk).group(1))
        cyc = int(re.search(r"Total Cycles:\s+(\d+)", blk).group(1))
        ins = int(re.search(r"Instructions:\s+(\d+)", blk).group(1)) // it
        br = sum(1 for i in regs[name] if _BRANCH.match(i) and not i.endswith(":"))
        res[name] = (cyc / it, ins, br)
    return res


def loops(seq):
    """top-level loops of an instruction list: (head index, backward-branch index) pairs"""
    out, i = [], 0
    while i < len(seq):
        if seq[i].endswith(":"):
            label = seq[i][:-1]
            last = max((j for j in range(i + 1, len(seq)) if _BRANCH.match(seq[j])
                        and seq[j].replace(",", " ").split()[-1] == label), default=None)
            if last is not None:
                out.append((i, last))
                i = last + 1
                continue
        i += 1
    return out


def nested_cost(name, seq, trips, iterations):
    """cycles of one pass over seq whose inner loops run trips[k] times each (preorder): the
    straight parts and each loop body are modelled separately and summed"""
    trips = list(trips)

    def cost(part, tag):
        ls = loops(part)
        if not ls:
            r = mca({tag: part}, iterations).get(tag)
            return r[0] if r else 0.0
        rest, total, prev = [], 0.0, 0
        for k, (h, e) in enumerate(ls):
            rest += part[prev:h]
            if not trips:
                raise ValueError("%s: more inner loops than trip counts given" % name)
            n = trips.pop(0)
            total += n * cost(part[h + 1: e + 1], "%s_l%d" % (tag, k))
            prev = e + 1
        rest += part[prev:]
        if [i for i in rest if not i.endswith(":")]:
            total += cost(rest, tag + "_r")
        return total

    total = cost(seq, name)
    if trips:
        raise ValueError("%s: %d trip count(s) unused" % (name, len(trips)))
    return total


# ---------------------------------------------------------------- ours
def ours(iterations, tmp):
    flags = our_flags()
    out = {}
    for kind, src in OURS:
        asm = os.path.join(tmp, src + ".s")
        run([CC] + flags + ["-I", SRC, "-S", os.path.join(SRC, src), "-o", asm])
        res = mca(regions(open(asm).read()), iterations)
        for tname, (tid, qk) in TYPES.items():
            for mc in (1, 4):
                # regions c6_<kind>n<R>_... take R weight rows per iteration (the 32-block types:
                # 4 at M=1, 2 at M=4 with smmla); they are what runs where they exist
                r, w = None, qk
                for rows, m in ((4, mc), (2, mc), (2, 2 if mc == 4 else 0), (1, mc)):
                    # (the k-quants run M=4 as two passes of 2 activation rows: region ..._m2)
                    r = res.get("c6_%s%s_t%d_m%d" % (kind, "n%d" % rows if rows > 1 else "", tid, m))
                    if r:
                        w = rows * qk * m // mc
                        break
                if r:
                    out[(kind, tname, mc)] = {"cycles_per_256": r[0] * 256 / (w * mc), "instructions": r[1],
                                              "branches": r[2]}
                    continue
                if r:
                    out[(kind, tname, mc)] = {"cycles_per_256": r[0] * 256 / (qk * mc), "instructions": r[1],
                                              "branches": r[2]}
    return out, " ".join(flags)


# ---------------------------------------------------------------- ggml
def find_ggml(arg, download):
    """the llama.cpp tree (…/vendor/llama.cpp) or None"""
    cands = [arg] if arg else []
    if os.environ.get("CAPIBARA6_GGML_SRC"):
        cands.append(os.environ["CAPIBARA6_GGML_SRC"])
    cands += sorted(glob.glob(os.path.join(CACHE, "llama_cpp_python-*")), reverse=True)
    cands += sorted(glob.glob("/tmp/lcp/llama_cpp_python-*"), reverse=True)
    if not any(cands) and download:
        os.makedirs(CACHE, exist_ok=True)
        log("[model] pip download llama-cpp-python==%s sdist into %s" % (LLAMA_CPP_PYTHON, CACHE))
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "llama-cpp-python==%s" % LLAMA_CPP_PYTHON, "-d", CACHE])
        cands = sorted(glob.glob(os.path.join(CACHE, "llama_cpp_python-*")), reverse=True)
    for c in cands:
        if not c or not os.path.exists(c):
            continue
        if c.endswith(".tar.gz"):
            dest = c[: -len(".tar.gz")]
            if not os.path.isdir(dest):
                with tarfile.open(c) as t:
                    t.extractall(os.path.dirname(c))
            c = dest
        for sub in ("", "vendor/llama.cpp"):
            root = os.path.join(c, sub)
            if os.path.isfile(os.path.join(root, "ggml/src/ggml-cpu/arch/arm/quants.c")):
                return root
    return None


def _matching_brace(text, i):
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    raise ValueError("unbalanced braces")


def mark_loop(text, func, loop_re, name):
    """text (preprocessed) with one iteration of the first loop matching loop_re inside the
    definition of func wrapped in llvm-mca markers"""
    for m in re.finditer(r"\b%s\s*\(" % re.escape(func), text):
        j = text.index(")", m.end())
        k = min(x for x in (text.find("{", j), text.find(";", j)) if x >= 0)
        if text[k] != "{":
            continue  # a declaration
        end = _matching_brace(text, k)
        body = text[k:end]
        lm = re.search(loop_re, body)
        if not lm:
            raise ValueError("%s: loop %r not found" % (func, loop_re))
        open_b = k + body.index("{", lm.end() - 1 if body[lm.end() - 1] == "{" else lm.end())
        close_b = _matching_brace(text, open_b)
        begin = '\n__asm volatile("# LLVM-MCA-BEGIN %s");\n' % name
        finish = '\n__asm volatile("# LLVM-MCA-END %s");\n' % name
        return text[: open_b + 1] + begin + text[open_b + 1: close_b] + finish + text[close_b:]
    raise ValueError("%s: definition not found" % func)


def ggml(root, iterations, tmp, types):
    g = os.path.join(root, "ggml")
    incs = ["-I", os.path.join(g, "include"), "-I", os.path.join(g, "src"), "-I", os.path.join(g, "src/ggml-cpu"),
            "-I", os.path.join(g, "src/ggml-cpu/arch/arm")]
    out, notes = {}, []
    for col, table, mcpu in (("ggml_vec_dot", GGML_VEC_DOT, MCPU + "+nosve"), ("ggml_v2", GGML_V2, MCPU)):
        by_src = {}
        for tname in types:
            src, func, loop_re, w = table[tname]
            by_src.setdefault(src, []).append((tname, func, loop_re, w))
        for src, items in by_src.items():
            cxx = src.endswith(".cpp")
            comp = CXX if cxx else CC
            if shutil.which(comp) is None:
                notes.append("%s: %s not found (apt-get install g++-aarch64-linux-gnu)" % (col, comp))
                continue
            base = [comp, "-O3", "-mcpu=" + mcpu, "-DNDEBUG", "-D_GNU_SOURCE", "-DGGML_USE_CPU_REPACK"]
            base += ["-std=c++17"] if cxx else ["-std=gnu11"]
            pre = run(base + incs + ["-E", os.path.join(g, "src/ggml-cpu/arch/arm", src)])
            for tname, func, loop_re, w in list(items):
                try:
                    pre = mark_loop(pre, func, loop_re, "%s_%s" % (col, tname))
                except ValueError as e:  # another llama.cpp version: say so, keep the rest
                    notes.append("%s %s: %s: skipped" % (tname, col, e))
                    items.remove((tname, func, loop_re, w))
            ipath = os.path.join(tmp, "%s_%s.%s" % (col, src, "ii" if cxx else "i"))
            with open(ipath, "w") as f:
                f.write(pre)
            asm = ipath + ".s"
            run(base + ["-S", ipath, "-o", asm])
            regs = regions(open(asm).read())
            res = mca({k: v for k, v in regs.items() if not loops(v)}, iterations)
            for tname, func, loop_re, w in items:
                name = "%s_%s" % (col, tname)
                if name in regs and loops(regs[name]):
                    if func not in GGML_TRIPS:
                        notes.append("%s %s: inner loops without trip counts: skipped" % (tname, func))
                        continue
                    try:
                        cyc = nested_cost(name, regs[name], GGML_TRIPS[func], iterations)
                    except ValueError as e:  # the compiler kept other loops than those listed
                        notes.append("%s %s: %s: skipped" % (tname, col, e))
                        continue
                    res[name] = (cyc, len([i for i in regs[name] if not i.endswith(":")]), 0)
                r = res.get(name)
                if r:
                    out[(col, tname)] = {"cycles_per_256": r[0] * 256 / w, "function": func, "instructions": r[1],
                                         "branches": r[2]}
    return out, notes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--ggml-types", default=None, help="types for ggml's columns (default: --types)")
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--ggml-src", default=None)
    ap.add_argument("--download", action="store_true")
    ap.add_argument("--no-ggml", action="store_true")
    ap.add_argument("--json-only", action="store_true")
    args = ap.parse_args(argv)
    types = [t for t in args.types.split(",") if t]
    for t in types:
        if t not in TYPES:
            ap.error("unknown type %s" % t)
    for tool in (CC, MCA):
        if shutil.which(tool) is None:
            log("bench_neon_model: %s not found (apt-get install -y gcc-aarch64-linux-gnu llvm-19)" % tool)
            return 2
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="c6-mca-")
    try:
        mine, flags = ours(args.iterations, tmp)
        theirs, notes = {}, []
        if args.no_ggml:
            notes.append("ggml: skipped (--no-ggml)")
        else:
            root = find_ggml(args.ggml_src, args.download)
            if root is None:
                notes.append("ggml: llama-cpp-python %s sdist not found (--ggml-src, $CAPIBARA6_GGML_SRC, %s, or "
                             "--download): ggml columns skipped" % (LLAMA_CPP_PYTHON, CACHE))
            else:
                gtypes = [t for t in (args.ggml_types or args.types).split(",") if t in TYPES]
                theirs, n2 = ggml(root, args.iterations, tmp, gtypes)
                notes += n2
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for t in types:
        row = {"type": t}
        for kind in ("i8", "i16"):
            for mc in (1, 4):
                r = mine.get((kind, t, mc))
                row["%s_m%d" % (kind, mc)] = round(r["cycles_per_256"], 2) if r else None
                if r and r["branches"]:
                    notes.append("%s %s M=%d: %d branch(es) inside the region" % (t, kind, mc, r["branches"]))
        for col in ("ggml_vec_dot", "ggml_v2"):
            r = theirs.get((col, t))
            row[col] = round(r["cycles_per_256"], 2) if r else None
            if r and r["branches"]:
                notes.append("%s %s (%s): %d branch(es) inside the region: an inner loop counted once, a lower "
                             "bound" % (t, col, r["function"], r["branches"]))
        for kind in ("i8_m1", "i16_m1"):
            g = row["ggml_v2"]
            row["%s_vs_ggml_v2" % kind] = round(row[kind] / g, 2) if row[kind] and g else None
        rows.append(row)

    if not args.json_only:
        print("Neoverse-V2, llvm-mca (%s), cycles per 256 weights per activation row; ours built with: %s"
              % (MCA, flags))
        hdr = ("type", "i8 M=1", "i8 M=4", "i16 M=1", "i16 M=4", "ggml vec_dot", "ggml V2", "i8/V2", "i16/V2")
        print("%-5s %8s %8s %8s %8s %13s %8s %6s %6s" % hdr)
        f = lambda v: "-" if v is None else "%.1f" % v  # noqa: E731
        g = lambda v: "-" if v is None else "%.2f" % v  # noqa: E731
        for r in rows:
            print("%-5s %8s %8s %8s %8s %13s %8s %6s %6s" % (
                r["type"], f(r["i8_m1"]), f(r["i8_m4"]), f(r["i16_m1"]), f(r["i16_m4"]), f(r["ggml_vec_dot"]),
                f(r["ggml_v2"]), g(r["i8_m1_vs_ggml_v2"]), g(r["i16_m1_vs_ggml_v2"])))
        for n in notes:
            print("note: " + n)
        print("(ggml V2 = what llama.cpp runs at M=1 on Neoverse-V2: the CPU_REPACK GEMV for Q4_0/Q8_0/Q4_K/Q5_K/"
              "Q6_K, vec_dot for Q5_0. Compute only: loads hit L1; no DRAM bandwidth, prefetch or store-to-load "
              "stalls. %.1f s)" % (time.time() - t0))
    print(json.dumps({"model": "llvm-mca neoverse-v2", "unit": "cycles per 256 weights per activation row",
                      "flags": flags, "rows": rows, "notes": notes, "seconds": round(time.time() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
