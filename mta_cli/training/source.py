"""Where training gets its data and teacher from, and the key-layer schedule that fits it.

Three kinds of source (`source_kind`): a cache (offline), a JSONL file with a live teacher run every step
(the online baseline), or a JSONL file alone (SFT, no teacher forward and no spaCy). Offline, and on a file
alone, the teacher model itself is needed only to initialise a pruned student or to lend its tokenizer.
The cache stores the teacher's absolute path and its weights fingerprint: a moved or copied cache finds it
by `--teacher PATH`, and a different model at that path is refused instead of silently used.
"""

from __future__ import annotations

import torch

from mta_cli.cache.reader import CacheReader
from mta_cli.cache.store import CacheError
from mta_cli.losses import default_key_layers, pair_teacher_layers
from mta_cli.losses.lens import final_norm
from mta_cli.models import (ModelLoadError, ModelSource, hidden_size, load_causal_lm, load_tokenizer, n_layers,
                            tokenizer_fingerprint, weights_fingerprint)
from mta_cli.segment import Segmenter
from mta_cli.teacher import output_head
from mta_cli.training.batches import CacheBatches
from mta_cli.training.data import DataBatches, LiveTeacher
from mta_cli.training.mixing import MixedBatches, cache_role, parse_cache_spec


def key_layers(student_layers: list[int] | None, teacher_layers: list[int] | None, word_layers: int,
               n_student: int, n_teacher: int, available: list[int], cached: bool) -> tuple[list[tuple], str]:
    """The (student layer, teacher layer, granularity) schedule and where it came from.

    - `student_layers` given: their teacher layers are `teacher_layers`, or floor(l_S * N_T / N_S) (method §6);
      the lowest `word_layers` pairs are word-level;
    - else `teacher_layers` given, or the layers a cache holds (`cached`): each with the student layer at
      the same relative depth (`pair_teacher_layers`), so any student depth fits a cache's layers;
    - else (online) the method §6 default: student layers N, N - N/4, N - N/2.
    """
    if student_layers:
        students = sorted(student_layers)
        teachers = sorted(teacher_layers) if teacher_layers else [l * n_teacher // n_student for l in students]
        if len(teachers) != len(students):
            raise ValueError(f"--teacher-layers {teachers} and --student-layers {students} must have the same length")
        n_word = min(word_layers, len(students))
        schedule = [(s, t, "word" if i < n_word else "phrase") for i, (s, t) in enumerate(zip(students, teachers))]
        origin = "--student-layers"
    elif teacher_layers or cached:
        wanted = teacher_layers or available
        schedule = pair_teacher_layers(wanted, n_student, n_teacher)
        if teacher_layers and len(schedule) != len(set(teacher_layers)):
            raise ValueError(f"--teacher-layers {sorted(teacher_layers)}: a {n_student}-layer student has room for "
                             f"only {len(schedule)} of them at matching depths; give fewer, or --student-layers too")
        origin = "--teacher-layers" if teacher_layers else f"the cache's layers {available}, at matching depths"
    else:
        schedule = default_key_layers(n_student, n_teacher, m=min(3, n_student))
        origin = "method default (student layers N, N - N/4, N - N/2)"
    bad = [s for s, _, _ in schedule if not 1 <= s <= n_student]
    if bad:
        raise ValueError(f"student layer(s) {bad} out of range 1..{n_student}")
    missing = [t for _, t, _ in schedule if t not in available]
    if missing:
        raise CacheError(f"teacher layer(s) {missing} of the key-layer schedule {schedule} are not available: "
                         f"the cache holds layers {available}. Pass --teacher-layers from those, "
                         f"or re-extract with --layers.")
    return schedule, origin


def same_teacher(readers: list[CacheReader], flag: str = "--cache") -> None:
    """Refuse caches of different teachers (or tokenizations) in one run, naming both; `flag` is the option
    that gave the caches after the first."""
    first = readers[0]
    for other in readers[1:]:
        for key, what in (("teacher", "weights"), ("tokenizer_sha256", "tokenizer")):
            a, b = first.meta["config"][key], other.meta["config"][key]
            if a != b:
                raise CacheError(f"--cache {first.url} and {flag} {other.url} come from different teachers "
                                 f"({first.meta['teacher']['path']} and {other.meta['teacher']['path']}: their {what} "
                                 "differ); a run trains against one teacher")


def source_kind(config) -> str:
    """"cache", "online" or "data": where a run's data and teacher come from; a ValueError that says what to
    pass for a combination that cannot run. Checked by TrainConfig, before anything loads.

    --data with an objective that reads the teacher (a KD loss, fdd, --mta) is the online baseline and needs
    --teacher. --data with --loss sft and no --mta reads no teacher: nothing runs but the student, and
    --teacher, when given, only initialises the pruned student (--init-from-teacher) or lends its tokenizer
    (--student-config).
    """
    if config.cache:
        if config.data:
            raise ValueError("--data trains without a cache (alone with --loss sft, or with --teacher for the online "
                             "baseline); offline training reads its data from --cache: give one of the two")
        return "cache"
    if not config.data:
        raise ValueError("nothing to train on: give --cache (offline), or --data FILE (alone with --loss sft, or with "
                         "--teacher for the online baseline)")
    objective = config.objective
    if objective.uses_teacher:
        if not config.teacher:
            what = "--mta" if objective.mta else f"--loss {objective.loss}"
            raise ValueError(f"{what} learns from a teacher, and --data alone has none: pass --teacher T to run it "
                             "live on the data (the online baseline), or train from --cache C (mta extract); only "
                             "--loss sft without --mta trains on --data alone")
        return "online"
    if config.teacher and config.student:
        raise ValueError("--teacher has nothing to do here: --loss sft without --mta runs no teacher, and --student "
                         "is the student. Drop --teacher, or start from the teacher's pruned copy with "
                         "--init-from-teacher --keep-layers K instead of --student (add --mta or a KD loss for the "
                         "online baseline)")
    if not config.teacher and not config.student:
        if config.init_from_teacher or config.student_config:
            flag = "--init-from-teacher" if config.init_from_teacher else "--student-config"
            raise ValueError(f"{flag} with --data needs --teacher T: the model to prune, or whose tokenizer a "
                             "random-init student uses (or give --student S)")
        raise ValueError("no student: give --student S, or --teacher T --init-from-teacher --keep-layers K")
    return "data"


class Source:
    """The teacher's facts (layers, sizes, head) and the batches: from a cache, from a live teacher, or none
    (SFT on --data alone: no teacher facts, `head` None).

    `notes` collects what the user should be told (e.g. that --teacher replaced the cache's teacher path)."""

    def __init__(self, config, device: torch.device):
        self.config, self.device = config, device
        self.notes: list[str] = []
        self.kind = source_kind(config)
        self.teacher_spec = config.teacher
        self.teacher_model, self.head, self.final_norm, self.tokenizer_sha = None, None, None, None
        self.n_teacher, self.teacher_dim, self.available = None, None, []
        if self.kind == "cache":
            specs = [parse_cache_spec(spec) for spec in config.cache_specs]
            self.readers = [CacheReader(url) for url, _ in specs]
            same_teacher(self.readers)
            self.weights = [1.0 if weight is None else weight for _, weight in specs]  # equal shares by default
            if sum(self.weights) <= 0:
                raise ValueError("the --cache weights sum to 0: give at least one cache a positive weight")
            self.reader = self.readers[0]
            meta = self.reader.meta
            self.stored_teacher = meta["teacher"]["path"]
            self.teacher_spec = config.teacher or self.stored_teacher
            self.weights_sha = meta["config"]["teacher"]["weights_sha256"]
            self.teacher_dtype = meta["config"]["teacher"]["dtype"]
            self.n_teacher = meta["teacher"]["n_layers"]
            self.teacher_dim = meta["teacher"]["hidden_size"]
            self.available = sorted(set.intersection(*(set(r.layers) for r in self.readers)))
            self.tokenizer_sha = meta["config"]["tokenizer_sha256"]
            self.head = self.reader.head.to(device)
            self.final_norm = self.reader.final_norm.to(device) if self.reader.final_norm else None
        elif self.kind == "online":
            self.teacher_model = load_causal_lm(config.teacher, "fp32", str(device), config.trust_remote_code)
            self.n_teacher = n_layers(self.teacher_model)
            self.teacher_dim = hidden_size(self.teacher_model)
            self.available = list(range(self.n_teacher + 1))
            self.head = output_head(self.teacher_model)
            self.final_norm = final_norm(self.teacher_model)

    @property
    def cached(self) -> bool:
        return self.kind == "cache"

    def teacher_location(self) -> str:
        """The teacher model's spec for loading, checked to exist; a message that says how to point at it."""
        try:
            ModelSource.parse(self.teacher_spec)
        except ModelLoadError:
            if self.config.teacher:
                raise
            raise ModelLoadError(f"the cache's teacher {self.stored_teacher} is not there (moved or deleted?); pass "
                                 "--teacher PATH with the same model (it is checked against the cache's weights "
                                 "fingerprint)") from None
        return self.teacher_spec

    def check_teacher(self, model) -> None:
        """Refuse a teacher model whose weights are not those the cache was extracted from."""
        if not self.cached:
            return
        found = weights_fingerprint(model, self.teacher_dtype)
        if found != self.weights_sha:
            raise ModelLoadError(f"{self.teacher_spec} is not the teacher of the cache {self.config.cache}: its weights "
                                 f"fingerprint {found[:12]}... differs from the cache's {self.weights_sha[:12]}...; "
                                 "pass --teacher with the model that was extracted")
        if self.config.teacher and self.config.teacher != self.stored_teacher:
            self.notes.append(f"teacher: {self.config.teacher} in place of the cache's {self.stored_teacher} "
                              "(weights fingerprint checked)")

    def tokenizer(self):
        """The student's tokenizer: its own (`--student`), else the teacher's, checked against the cache's."""
        c = self.config
        if c.student:
            return load_tokenizer(c.student, c.trust_remote_code)
        tokenizer = load_tokenizer(self.teacher_location() if self.cached else self.teacher_spec, c.trust_remote_code)
        if self.cached and tokenizer_fingerprint(tokenizer) != self.tokenizer_sha:
            raise ModelLoadError(f"{self.teacher_spec} is not the teacher of the cache {c.cache}: its tokenizer differs "
                                 "from the one the cache was extracted with; pass --teacher with the model that was "
                                 "extracted")
        return tokenizer

    def layers(self, teacher_layers: list[int]) -> list[int]:
        """The teacher layers a batch carries: `teacher_layers` and the last (the logits); none without a teacher."""
        return sorted({self.n_teacher} | set(teacher_layers)) if self.kind != "data" else []

    def batches(self, tokenizer, layers: list[int], own_tokenizer: bool, part: tuple[int, int] = (0, 1)):
        """The run's batches; `part` = (rank, world): this rank's share of each global batch (offline only)."""
        c = self.config
        if self.cached:
            teacher_pad = self.reader.meta["tokenizer"]["pad_token_id"] or 0
            loaders = [CacheBatches(reader, c.batch_size, layers, c.seed + i, teacher_pad,
                                    student_tokenizer=tokenizer if own_tokenizer else None, part=part)
                       for i, reader in enumerate(self.readers)]
            return MixedBatches(loaders, self.weights, [cache_role(r) for r in self.readers])
        teacher = LiveTeacher(self.teacher_model, layers, self.device, Segmenter()) if self.kind == "online" else None
        batches = DataBatches(tokenizer, c.data, c.batch_size, c.seed, c.max_length, c.max_prompt_length, teacher)
        if batches.dropped:
            self.notes.append(f"{c.data}: {batches.dropped} record(s) dropped, no response token left within "
                              f"--max-length {c.max_length} / --max-prompt-length {c.max_prompt_length}")
        return batches
