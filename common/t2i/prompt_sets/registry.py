"""The prompt sets of the memorization literature: where each file comes from (repository, commit, path), its
SHA-256, licence and row count, how its rows read (caption, label, Webster type and ground-truth index columns), and
whether diffmem ships it.

A set is shipped (``common/t2i/prompt_sets/data/``) only where its source's licence allows copying it; every other
set is fetched from its source at the pinned commit (``diffmem-prompt-sets fetch NAME``) and checked against the
SHA-256 recorded here. Every hash, commit and count below was computed from the files themselves; a set that could
not be found is kept with ``verified=False`` and what is known of it, and can be neither read nor fetched.
Torch-free (stdlib and ``common.hub``, itself stdlib-only): a CLI's argument checks read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffmem.common.hub import REMOVED_MODELS

SET_PREFIX = "set:"  # --data set:NAME names a registry set wherever a prompt file is taken
FORMATS = ("jsonl", "csv", "lines")  # lines: one prompt per line, nothing else
RAW_URL = "https://raw.githubusercontent.com/{repo}/{commit}/{path}"

# The sources' commits: each the newest commit of the repository's snapshot the files were read from.
WEN_COMMIT = "c8fe471d80b62213bdc8a384543ff44b44c62020"  # YuxinWenRick/diffusion_memorization, 2024-04-03
NEMO_COMMIT = "f952eded64fca0bcf42e0bb3be9a01d64653cfdb"  # ml-research/localizing_memorization_..., 2025-07-18
MEMATTN_COMMIT = "c66efd22d8ffd4b1c6b87835708fa1437a2e076b"  # renjie3/MemAttn, 2025-02-22
ASTHANA_COMMIT = "97e991bac4171ad0547c5779c31180ea8e9f672e"  # rohanasthana/memorization-anisotropy, 2026-01-29
EARLY26_COMMIT = "fe315bbb1cd6fc8b973f1dc88f6bb88a4c4431ab"  # randomnameforicml/icml-2026, 2026-01-30
MEMBENCH_COMMIT = "f22a0fdcd24fa0f4a43bf7b9a8e42c8c78af302f"  # chunsanHong/MemBench_code, 2024-09-30
CLIPMEM_COMMIT = "54b95bfe6d815be5274befcf8de3fc1445ab60f1"  # quasar529/sd-clip-mem, 2026-04-06

CLIPMEM_PAPER = "Memorization in Stable Diffusion Is Unexpectedly Driven by CLIP Embeddings, CVPR 2026 Findings"
NO_LICENCE = "none stated (no licence file in the repository)"


@dataclass(frozen=True)
class PromptSet:
    """One prompt set: its source file, how to read it, and what the papers used it for.

    ``label`` is the set's class (1 memorized, 0 not); ``type_column`` holds Webster's per-row replication type
    (VM/TM as Hintersdorf et al. write it, MV/TV/RV as Webster does) where the set has one; ``index_column`` the
    LAION index that names a prompt's ground-truth folder (``gt_images/{index}/``). ``shipped`` names the file under
    ``data/`` that diffmem carries; None: fetched into the cache.
    """

    name: str
    description: str
    paper: str
    repo: str | None
    commit: str | None
    path: str | None
    sha256: str | None
    licence: str
    rows: int | None
    format: str
    caption_column: str
    label: int
    model: str  # the model the set was selected on, as a live Hub id (mirrors for removed ones, common.hub)
    type_column: str | None = None
    index_column: str | None = None
    shipped: str | None = None
    delimiter: str = ","
    verified: bool = True
    notes: str = ""

    @property
    def url(self) -> str | None:
        """The file at the pinned commit (None for a set not found)."""
        if not (self.repo and self.commit and self.path):
            return None
        return RAW_URL.format(repo=self.repo, commit=self.commit, path=self.path)

    @property
    def file_name(self) -> str:
        """The file's name in the cache (and under data/ when shipped)."""
        return self.shipped or f"{self.name}{_suffix(self.path or '', self.format)}"

    @property
    def fetch_command(self) -> str:
        return f"diffmem-prompt-sets fetch {self.name}"

    @property
    def source(self) -> str:
        """``repo@commit:path``, or what is known of an unverified set."""
        if self.repo and self.commit and self.path:
            return f"{self.repo}@{self.commit[:12]}:{self.path}"
        return self.repo or "unknown"


def _suffix(path: str, fmt: str) -> str:
    dot = path.rfind(".")
    return path[dot:] if dot > path.rfind("/") else {"jsonl": ".jsonl", "csv": ".csv"}.get(fmt, ".txt")


SD1 = "CompVis/stable-diffusion-v1-4"
SD2 = REMOVED_MODELS["stabilityai/stable-diffusion-2"][1][0]  # the removed SD 2's mirror (common.hub)
RV = "SG161222/Realistic_Vision_V5.1_noVAE"  # as Asthana & Belagiannis's detect_mem.py names it (sd_ver 99)

PROMPT_SETS: dict[str, PromptSet] = {s.name: s for s in (
    PromptSet(
        "webster_sd1_500", "Stable Diffusion v1's 500 memorized LAION prompts (caption, LAION index, image url)",
        "Webster 2023, as shipped with Wen et al., ICLR 2024", "YuxinWenRick/diffusion_memorization", WEN_COMMIT,
        "examples/sdv1_500_memorized.jsonl",
        "8eb16c6ff1c7195cddf26b3207bdc7c6a905a20162c6070d79fe60336a525c60", NO_LICENCE, 500, "jsonl", "caption", 1,
        SD1, index_column="index",
        notes="the same 500 prompts with Webster's labels: webster_sd1_500_labels"),
    PromptSet(
        "webster_sd1_500_labels",
        "the same 500 prompts with Webster's labels: VM (verbatim, 112) / TM (template, 388), mean/max SSCD, index",
        "Hintersdorf et al., NeurIPS 2024 (NeMo)",
        "ml-research/localizing_memorization_in_diffusion_models", NEMO_COMMIT, "prompts/memorized_laion_prompts.csv",
        "0b527a5965dc463e7a3e0d234ff7fd5489b1a76869c456dbb209dc753cb4af25", "MIT", 500, "csv", "Caption", 1, SD1,
        type_column="type", index_column="Index", delimiter=";"),
    PromptSet(
        "nemo_laion_nonmem_500", "500 non-memorized LAION prompts", "Hintersdorf et al., NeurIPS 2024 (NeMo)",
        "ml-research/localizing_memorization_in_diffusion_models", NEMO_COMMIT,
        "prompts/unmemorized_laion_prompts.csv",
        "f453b418cc157864baacbf68d97447273feac41e8066b2ead6b307bf795988e1", "MIT", 500, "csv", "Caption", 0, SD1,
        index_column="Index", delimiter=";"),
    PromptSet(
        "nemo_coco2014_val_10000", "10 000 COCO 2014 validation captions", "Hintersdorf et al., NeurIPS 2024 (NeMo)",
        "ml-research/localizing_memorization_in_diffusion_models", NEMO_COMMIT, "prompts/coco2014_val_10000.csv",
        "5445e449c60fd6b326a05c79a683c4d64620b0330a372de843eb6b9dbe5901e3", "MIT", 10000, "csv", "Caption", 0, SD1,
        index_column="Index", delimiter=";", notes="MIT, but 642 kB: fetched rather than shipped"),
    PromptSet(
        "memattn_sd1_mem345", "345 SD v1 memorized prompts (a subset of Webster's 500)",
        "Ren et al., ECCV 2024 (MemAttn)", "renjie3/MemAttn", MEMATTN_COMMIT, "prompt/sd1_mem345.txt",
        "70f370c4728aecd18e0db95dc58e9741b0f1a278dbfddb31d7d0754f69f8d069", "MIT", 345, "lines", "line", 1, SD1,
        shipped="memattn_sd1_mem345.txt"),
    PromptSet(
        "memattn_sd2_mem219", "219 SD 2 memorized prompts", "Ren et al., ECCV 2024 (MemAttn)", "renjie3/MemAttn",
        MEMATTN_COMMIT, "prompt/sd2_mem219.txt",
        "5776ec85cc25fde8c4843af990041a85813c3af7cb817c45dabb1a1bb9b6356f", "MIT", 219, "lines", "line", 1, SD2,
        shipped="memattn_sd2_mem219.txt"),
    PromptSet(
        "memattn_group_nomem500", "500 non-memorized prompts", "Ren et al., ECCV 2024 (MemAttn)", "renjie3/MemAttn",
        MEMATTN_COMMIT, "prompt/group_nomem500.txt",
        "4e0de75ae37b4fb2f8676026d876d9f4b03267a90041af4069d74b912e588c2d", "MIT", 500, "lines", "line", 0, SD1,
        shipped="memattn_group_nomem500.txt"),
    PromptSet(
        "asthana_sd2_mem", "219 SD 2 memorized prompts with Webster's types (MV 4, TV 215) and LAION index",
        "Asthana & Belagiannis, ICLR 2026 (anisotropy)", "rohanasthana/memorization-anisotropy", ASTHANA_COMMIT,
        "prompts/sd2_mem.jsonl", "fc2f6553f676e8fb94bf5b2eddfef80915131aeca23fa44e49c54edd6968ca74", "MIT", 219,
        "jsonl", "caption", 1, SD2, type_column="overfit_type", index_column="index", shipped="asthana_sd2_mem.jsonl",
        notes="their code runs prompts/sd2_mem.txt, the same captions; the paper's model id is the removed "
              "stabilityai/stable-diffusion-2"),
    PromptSet(
        "asthana_sd2_nmem", "500 non-memorized prompts (their sd1_nmem.txt is the same file)",
        "Asthana & Belagiannis, ICLR 2026 (anisotropy)", "rohanasthana/memorization-anisotropy", ASTHANA_COMMIT,
        "prompts/sd2_nmem.txt", "628796e195391501591859f55e249cca70e8fcaa7ceb33aac1d753fbfe4d8a4c", "MIT", 500,
        "lines", "line", 0, SD2, shipped="asthana_sd2_nmem.txt"),
    PromptSet(
        "asthana_rv_mem", "90 prompts memorized by Realistic Vision (an SD 1.5 fine-tune)",
        "Asthana & Belagiannis, ICLR 2026 (anisotropy)", "rohanasthana/memorization-anisotropy", ASTHANA_COMMIT,
        "prompts/RV_mem.txt", "a23d5ac7a8f4fbfaa440ef6a793a55331a8a9e3416cda4dc58790b32b96fc392", "MIT", 90,
        "lines", "line", 1, RV, shipped="asthana_rv_mem.txt",
        notes="the repository also holds RV_mem_full.txt (500 rows), which their run_detection.sh does not use"),
    PromptSet(
        "asthana_rv_nmem", "90 non-memorized prompts for Realistic Vision",
        "Asthana & Belagiannis, ICLR 2026 (anisotropy)", "rohanasthana/memorization-anisotropy", ASTHANA_COMMIT,
        "prompts/RV_nmem.txt", "da5fab8a0da55149d394efccc7a71058d9699a51f27bf90d31589cfe7ecfe713", "MIT", 90,
        "lines", "line", 0, RV, shipped="asthana_rv_nmem.txt"),
    PromptSet(
        "early26_mem_sample", "10 memorized prompts, the repository's demo sample (Webster's first 10)",
        "Early Detection of Memorization, ICML 2026", "randomnameforicml/icml-2026", EARLY26_COMMIT,
        "data/memorized_prompts_sample.jsonl",
        "ebffc695b035f9fdf70f7bef6ad29945fa6bb469fb1390634099fb50733c1cd0", "MIT", 10, "jsonl", "prompt", 1,
        "stable-diffusion-v1-5/stable-diffusion-v1-5", shipped="early26_memorized_prompts_sample.jsonl",
        notes="the paper's 500 memorized prompts are not in the repository; these 10 are webster_sd1_500's first 10"),
    PromptSet(
        "early26_nonmem_sample", "10 non-memorized prompts, the repository's demo sample",
        "Early Detection of Memorization, ICML 2026", "randomnameforicml/icml-2026", EARLY26_COMMIT,
        "data/non_memorized_prompts_sample.jsonl",
        "5fbd03c9c96fa4aa56b8b1a765130f2a9d2aa60b06151dcfda8303221334b565", "MIT", 10, "jsonl", "prompt", 0,
        "stable-diffusion-v1-5/stable-diffusion-v1-5", shipped="early26_non_memorized_prompts_sample.jsonl"),
    PromptSet(
        "early26_nonmem_500", "the paper's 500 non-memorized prompts (N=500+500)",
        "Early Detection of Memorization, ICML 2026", "randomnameforicml/icml-2026", None, None, None,
        "MIT (the repository's)", 500, "jsonl", "prompt", 0, "stable-diffusion-v1-5/stable-diffusion-v1-5",
        verified=False,
        notes="not released: the README runs detect.py on path/to/non_memorized_500.jsonl; no file, hash or commit"),
    PromptSet(
        "membench_sd1_final", "MemBench's 3 000 SD 1 memorized-image trigger prompts (prompt, image urls)",
        "Hong et al., 2024 (MemBench, arXiv 2407.17095)", "chunsanHong/MemBench_code", MEMBENCH_COMMIT,
        "SD1_final.csv", "8c41867a67ea184c4f7f3c9765eeb55faa3b5058d1552e014616de9198d110c7", NO_LICENCE, 3000, "csv",
        "prompt", 1, SD1, notes="quasar529/sd-clip-mem's dataset/Membench_sd1.csv is the same file (same SHA-256)"),
    PromptSet(
        "cvpr26_extended_mv_458", "458 SD 1 matching-verbatim memorized prompts (prompt, image url)",
        CLIPMEM_PAPER, "quasar529/sd-clip-mem",
        CLIPMEM_COMMIT, "dataset/extended_mv_458_sd1.csv",
        "c447b45cfffb535f30b52896c3f8acd6136ce8a2377c98da00350705d203d18d", NO_LICENCE, 458, "csv", "prompt", 1, SD1,
        notes="their --dataset ours458"),
    PromptSet(
        "cvpr26_non_mem_1500", "1 500 non-memorized COCO train 2017 captions (prompt, image url)",
        CLIPMEM_PAPER, "quasar529/sd-clip-mem",
        CLIPMEM_COMMIT, "dataset/non_mem_1500.csv",
        "bf788ed68408694c3088e28052c104a7b5f066756ebd29c7e46bf0f3e5b85ff8", NO_LICENCE, 1500, "csv", "prompt", 0, SD1),
)}


def unknown_set_message(name: str) -> str:
    return f"{SET_PREFIX}{name}: no such prompt set (known: {', '.join(PROMPT_SETS)}; `diffmem-prompt-sets list`)"


def set_name(source: str) -> str | None:
    """NAME of a ``set:NAME`` reference, None for anything else."""
    return source[len(SET_PREFIX):] if isinstance(source, str) and source.startswith(SET_PREFIX) else None
