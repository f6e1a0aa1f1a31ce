"""Benchmark of `dpn preprocess` (not part of the test suite). Prints one JSON object per section and a
final JSON line with everything; bench/RESULTS_preprocess.md reports a run.

Sections (all by default; pick with --sections):
  e2e         `dpn synth` (2,000 + 2,000 records) then `dpn preprocess` of its 2,000 instruct records, as
              fresh processes (cold: Ray start and worker imports included).
  throughput  images/s of Ray Data against a plain single-process loop doing the same work (ijson parse,
              RecordProcessor on every record, the same Parquet writer), for image_storage "bytes" and
              "pixels", in one run with Ray warm; the ratio is Ray / loop. Two workloads: the synthetic
              corpus at the tiny preset's 48 px, and photo-like 640x480 JPEGs at LLaVA-1.5's 336 px (the
              synthetic scenes are tiny and flat, so they understate decoding and pixel storage). Also the
              shard bytes per row of each storage.
  loader      what the training loader pays per image to build micro-batches, for both storages.
  rss         a generated 665K-record LLaVA file (~1 GB, mix665K-like turns) through `dpn preprocess` in a
              fresh process: its driver peak RSS, time and rows/s; and `json.load` of a tenth of it.

Usage: python bench/preprocess_throughput.py --work /tmp/dpn-bench [--sections e2e,throughput] [--cpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("e2e", "throughput", "loader", "rss")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}


def _dpn(*args: str) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"dpn {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), seconds


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _corpus(work: Path) -> Path:
    corpus = work / "corpus"
    if not (corpus / "manifest.json").is_file():
        from pipelines.data.synth.corpus import generate_corpus

        generate_corpus(corpus, seed=0)
    return corpus


def section_e2e(work: Path, cpus: int) -> dict:
    out = work / "e2e"
    shutil.rmtree(out, ignore_errors=True)
    synth, t_synth = _dpn("synth", "--out", str(out / "corpus"), "--seed", "1")
    c = out / "corpus"
    pre, t_pre = _dpn("preprocess", "--annotations", str(c / "instruct.json"), "--image-root", str(c / "images"),
                      "--tokenizer", str(c / "tokenizer"), "--template", "vicuna_v1", "--out", str(out / "shards"),
                      "--router-token", "--num-cpus", str(cpus))
    again, t_again = _dpn("preprocess", "--annotations", str(c / "instruct.json"), "--image-root", str(c / "images"),
                          "--tokenizer", str(c / "tokenizer"), "--template", "vicuna_v1", "--out", str(out / "shards"),
                          "--router-token", "--num-cpus", str(cpus))
    return {"synth_s": round(t_synth, 1), "preprocess_s": round(t_pre, 1), "total_s": round(t_synth + t_pre, 1),
            "records": pre["rows_in"], "rows_out": pre["rows_out"], "quarantined": pre["quarantined"],
            "preprocess_inner_s": pre["seconds"], "rerun_s": round(t_again, 1), "rerun_reused": again["reused"],
            "synth_records": synth["pretrain"] + synth["instruct"], "load_avg": _load()}


def _big_annotations(corpus: Path, path: Path, repeat: int) -> int:
    records = (json.loads((corpus / "pretrain.json").read_text()) + json.loads((corpus / "instruct.json").read_text()))
    # Pretrain records use the plain template's one-exchange shape; vicuna_v1 takes them too.
    path.write_text(json.dumps(records * repeat), encoding="utf-8")
    return len(records) * repeat


def _loop(cfg, block_rows: list[int]) -> dict:
    """The plain single-process loop: same parser (ijson, streaming the file once), same per-record code,
    same writer, same blocks; no fingerprint and no byte offsets, which it does not need."""
    import ijson

    from pipelines.data.preprocess import _WorkerSpec, build_processor, write_block

    proc = build_processor(_WorkerSpec.from_config(cfg))
    out = Path(tempfile.mkdtemp(dir=cfg.out))
    (out / "shards").mkdir()
    (out / "quarantine").mkdir()
    start, cpu = time.perf_counter(), time.process_time()
    results, idx, records = [], [], []
    sizes = iter(block_rows)
    size = next(sizes, None)
    with open(cfg.annotations, "rb") as f:
        for i, item in enumerate(ijson.items(f, "item", use_float=True)):
            idx.append(i)
            records.append(item)
            if len(idx) == size:
                results.append(write_block(proc.process_records(idx, records), out))
                idx, records = [], []
                size = next(sizes, None)
    if idx:  # only when block_rows covers fewer records than the file has
        results.append(write_block(proc.process_records(idx, records), out))
    seconds, cpu_s = time.perf_counter() - start, time.process_time() - cpu
    shutil.rmtree(out)
    return {"seconds": seconds, "cpu_s": cpu_s, "images": sum(r["images"] for r in results),
            "rows": sum(r["rows"] for r in results), "bytes": sum(r["bytes"] for r in results)}


def _photo(rng: np.random.Generator, w: int = 640, h: int = 480):
    """A photo-like image: smooth random colour fields plus sensor-like noise (JPEG-compresses like a photo)."""
    from PIL import Image, ImageFilter

    small = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    a = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "RGB")


def _photo_corpus(work: Path, n_images: int = 400, repeat: int = 6) -> Path:
    """COCO-like 640x480 JPEGs (q90) with one VQA exchange each; records repeat the images `repeat` times."""
    root = work / "photo"
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n_images):
        path = images / f"{i:06d}.jpg"
        if not path.exists():
            _photo(rng).save(path, format="JPEG", quality=90)
    records = [{"id": f"{i:06d}", "image": f"{i:06d}.jpg",
                "conversations": [{"from": "human", "value": "<image>\nWhat color is the circle?"},
                                  {"from": "gpt", "value": "red"}]} for i in range(n_images)] * repeat
    (root / "ann.json").write_text(json.dumps(records))
    return root


def _workloads(work: Path, repeat: int) -> dict[str, dict]:
    corpus = _corpus(work)
    ann = work / "big.json"
    n = _big_annotations(corpus, ann, repeat)
    photo = _photo_corpus(work)
    return {
        # The embedded default: 96-160 px PNG/JPEG scenes, tiny preset (48 px, 144 visual tokens).
        "synthetic@48": {"records": n, "cfg": dict(annotations=str(ann), image_root=str(corpus / "images"),
                                                   tokenizer=str(corpus / "tokenizer"), template="vicuna_v1",
                                                   image_size=48, num_image_tokens=144, add_router_token=True)},
        # LLaVA-1.5 geometry on COCO-sized photos (336 px, 576 visual tokens).
        "photo@336": {"records": 2400, "cfg": dict(annotations=str(photo / "ann.json"), image_root=str(photo / "images"),
                                                   tokenizer=str(corpus / "tokenizer"), template="vicuna_v1",
                                                   image_size=336, num_image_tokens=576, add_router_token=True)},
    }


def section_throughput(work: Path, cpus: int, repeat: int, rounds: int, workloads: list[str]) -> dict:
    from pipelines.data.loader import open_shards
    from pipelines.data.preprocess import PreprocessConfig, ensure_ray, plan_blocks, preprocess

    ensure_ray(cpus)  # workers at nice 0, like the loop (Ray's default is 15)
    result: dict = {"cpus": cpus, "rounds": rounds}
    for name, w in _workloads(work, repeat).items():
        if name not in workloads:
            continue
        result[name] = {"records": w["records"]}
        for storage in ("bytes", "pixels"):
            # Untimed first pass of each: loads this config's tokenizer/processor in every worker, warms
            # the page cache and the allocators (the first pass ran up to 2.7x the CPU of later ones).
            shutil.rmtree(work / "tp-first", ignore_errors=True)
            preprocess(PreprocessConfig(**w["cfg"], out=str(work / "tp-first"), image_storage=storage))
            shutil.rmtree(work / "tp-first")
            cfg = PreprocessConfig(**w["cfg"], out=str(work), image_storage=storage)
            # The loop writes the very blocks (= shard files) the Ray run writes.
            block_rows = plan_blocks(w["records"], cpus, cfg.rows_per_shard)
            _loop(cfg, block_rows)
            ray_runs, loop_runs = [], []
            for r in range(rounds):  # interleaved, so background load hits both alike
                out = work / f"tp-{storage}-{r}"
                shutil.rmtree(out, ignore_errors=True)
                s = preprocess(PreprocessConfig(**w["cfg"], out=str(out), image_storage=storage))
                # Ray time: the Ray Data execution plus the driver's search for the records' byte offsets
                # (work the loop does not need); the rest of fingerprinting is left out, as the loop does none.
                ray_runs.append({"seconds": s.extra["process_s"] + s.extra["split_s"], "total_s": s.seconds,
                                 "split_s": s.extra["split_s"], "images": s.images_out,
                                 "bytes": s.shard_bytes, "rows": s.rows_out, "cpu_s": s.extra["task_cpu_s"]})
                assert open_shards(s.path).manifest["config"]["blocks"] == len(block_rows)
                shutil.rmtree(out)
                loop_runs.append(_loop(cfg, block_rows))
            # Best round (least disturbed by other sessions on the shared cores, as timeit reports) and median.
            ray_ips = [r["images"] / r["seconds"] for r in ray_runs]
            loop_ips = [r["images"] / r["seconds"] for r in loop_runs]
            result[name][storage] = {
                "ray_images_per_s": round(max(ray_ips), 1), "loop_images_per_s": round(max(loop_ips), 1),
                "ratio": round(max(ray_ips) / max(loop_ips), 2),
                "ratio_median": round(statistics.median(ray_ips) / statistics.median(loop_ips), 2),
                # CPU per image in the processing tasks vs in the loop: the same work, or Ray overhead?
                "ray_task_cpu_ms_per_image": round(1e3 * statistics.median(r["cpu_s"] / r["images"] for r in ray_runs), 3),
                "loop_cpu_ms_per_image": round(1e3 * statistics.median(r["cpu_s"] / r["images"] for r in loop_runs), 3),
                "ray_process_s": [round(r["seconds"], 2) for r in ray_runs],
                "ray_total_s": [round(r["total_s"], 2) for r in ray_runs],
                "loop_s": [round(r["seconds"], 2) for r in loop_runs],
                "images": ray_runs[0]["images"], "rows_out": ray_runs[0]["rows"],
                "shard_bytes_per_row": round(ray_runs[0]["bytes"] / ray_runs[0]["rows"], 1),
            }
    result["load_avg"] = _load()
    return result


def section_loader(work: Path, cpus: int, repeat: int) -> dict:
    """Per-row cost of building micro-batches (batch 16) from each storage, in the training process."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data.loader import iter_micro_batches, open_shards
    from pipelines.data.preprocess import PreprocessConfig, ensure_ray, preprocess

    ensure_ray(cpus)  # workers at nice 0, like the loop (Ray's default is 15)
    result: dict = {}
    for name, w in _workloads(work, repeat).items():
        result[name] = {}
        for storage in ("bytes", "pixels"):
            s = preprocess(PreprocessConfig(**w["cfg"], out=str(work / f"ld-{name}-{storage}"), image_storage=storage))
            info = open_shards(s.path)
            table = pa.concat_tables([pq.read_table(f) for f in info.files])
            table = table.slice(0, min(table.num_rows, 2000))
            # Untimed: the first batches import torch/transformers' image processing into this process.
            for _ in iter_micro_batches(table.slice(0, 48), info, micro_batch_size=16, seed=0, epoch=0):
                pass
            start = time.perf_counter()
            images = 0
            for b in iter_micro_batches(table, info, micro_batch_size=16, seed=0, epoch=0):
                images += len(b["pixel_values"]) if "pixel_values" in b else 0
            seconds = time.perf_counter() - start
            result[name][storage] = {"rows": table.num_rows, "images": images,
                                     "ms_per_image": round(1e3 * seconds / max(images, 1), 3)}
    result["load_avg"] = _load()
    return result


_WORDS = ("the a an red green blue yellow purple orange circle square triangle cross image picture object objects "
          "left right above below of and in on is are there what which how many color shape size small large "
          "medium near far top bottom corner middle one two three four five six seven eight nine ten yes no").split()


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def write_665k(corpus: Path, path: Path, n: int, seed: int = 0) -> int:
    """A mix665K-sized LLaVA array (streamed to disk): 1-6 exchanges per record, answers of up to 100 words,
    10% text-only records, ids repeating as in the real mix, images drawn from the synthetic corpus."""
    rng = random.Random(seed)
    images = sorted(p.relative_to(corpus / "images").as_posix() for p in (corpus / "images" / "instruct").iterdir())
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(n):
            text_only = rng.random() < 0.1
            turns = []
            for t in range(rng.randint(1, 6)):
                q = _sentence(rng, 4, 20)
                if t == 0 and not text_only:
                    q = "<image>\n" + q
                turns += [{"from": "human", "value": q}, {"from": "gpt", "value": _sentence(rng, 1, 100)}]
            rec = {"id": f"{rng.randrange(n // 2):012d}", "conversations": turns}
            if not text_only:
                rec["image"] = rng.choice(images)
            f.write(("," if i else "") + json.dumps(rec))
        f.write("]")
    return path.stat().st_size


def section_rss(work: Path, cpus: int, n: int) -> dict:
    corpus = _corpus(work)
    big = work / f"llava_{n}.json"
    if not big.exists():
        write_665k(corpus, big, n)
    tenth = work / f"llava_{n // 10}.json"
    if not tenth.exists():
        write_665k(corpus, tenth, n // 10)
    out = work / "rss-out"
    shutil.rmtree(out, ignore_errors=True)
    summary, wall = _dpn("preprocess", "--annotations", str(big), "--image-root", str(corpus / "images"),
                         "--tokenizer", str(corpus / "tokenizer"), "--template", "vicuna_v1", "--out", str(out),
                         "--router-token", "--num-cpus", str(cpus))
    code = "import json,resource,sys; d=json.load(open(sys.argv[1])); " \
           "print(len(d), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)"
    proc = subprocess.run([sys.executable, "-c", code, str(tenth)], capture_output=True, text=True, check=True)
    count, json_rss = proc.stdout.split()
    result = {
        "records": n, "file_mb": round(big.stat().st_size / 2**20, 1), "driver_peak_rss_mib": summary["driver_peak_rss_mib"],
        "seconds": summary["seconds"], "wall_s": round(wall, 1), "rows_per_s": summary["rows_per_s"],
        "fingerprint_s": summary["fingerprint_s"], "split_s": summary["split_s"], "process_s": summary["process_s"],
        "rows_out": summary["rows_out"], "quarantined": summary["quarantined"], "shards": summary["shards"],
        "shard_mb": round(summary["shard_bytes"] / 2**20, 1),
        "json_load_tenth": {"records": int(count), "file_mb": round(tenth.stat().st_size / 2**20, 1),
                            "peak_rss_mib": round(float(json_rss), 1)},
        "load_avg": _load(),
    }
    shutil.rmtree(out, ignore_errors=True)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "dpn-bench-preprocess"))
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--repeat", type=int, default=4, help="throughput: copies of the 4,000 synthetic records")
    p.add_argument("--rounds", type=int, default=2, help="throughput: interleaved Ray/loop rounds (median)")
    p.add_argument("--workloads", default="synthetic@48,photo@336", help="throughput: which workloads")
    p.add_argument("--rss-records", type=int, default=665_000)
    args = p.parse_args()
    os.environ.update({k: v for k, v in ENV.items() if k not in os.environ})
    sys.path.insert(0, str(ROOT))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    sections = [s for s in args.sections.split(",") if s]
    bad = set(sections) - set(SECTIONS)
    if bad:
        p.error(f"unknown sections {sorted(bad)}; valid: {SECTIONS}")
    results = {"cpus": args.cpus, "nproc": os.cpu_count()}
    for name in sections:
        start = time.perf_counter()
        if name == "e2e":
            r = section_e2e(work, args.cpus)
        elif name == "throughput":
            r = section_throughput(work, args.cpus, args.repeat, args.rounds, args.workloads.split(","))
        elif name == "loader":
            r = section_loader(work, args.cpus, args.repeat)
        else:
            r = section_rss(work, args.cpus, args.rss_records)
        r["section_s"] = round(time.perf_counter() - start, 1)
        results[name] = r
        print(json.dumps({name: r}), flush=True)
    results["bench_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
