"""Where training gets its teacher from: a cache (offline) or a live teacher (online), and the key-layer
schedule that fits it.

Offline, the teacher model itself is needed only to initialise a pruned student or to lend its tokenizer.
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
from mta_cli.teacher import output_head
from mta_cli.training.batches import CacheBatches
from mta_cli.training.mixing import MixedBatches, cache_role, parse_cache_spec
from mta_cli.training.online import OnlineBatches


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


def same_teacher(readers: list[CacheReader]) -> None:
    """Refuse caches of different teachers (or tokenizations) in one run, naming both."""
    first = readers[0]
    for other in readers[1:]:
        for key, what in (("teacher", "weights"), ("tokenizer_sha256", "tokenizer")):
            a, b = first.meta["config"][key], other.meta["config"][key]
            if a != b:
                raise CacheError(f"--cache {first.url} and --cache {other.url} come from different teachers "
                                 f"({first.meta['teacher']['path']} and {other.meta['teacher']['path']}: their {what} "
                                 "differ); a run trains against one teacher")


class Source:
    """The teacher's facts (layers, sizes, head) and the batches, from a cache or from a live teacher.

    `notes` collects what the user should be told (e.g. that --teacher replaced the cache's teacher path)."""

    def __init__(self, config, device: torch.device):
        self.config, self.device = config, device
        self.notes: list[str] = []
        if config.cache:
            if config.data:
                raise ValueError("--data is for the online baseline (with --teacher and no --cache); "
                                 "offline training reads its data from --cache")
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
            self.teacher_model = None
        else:
            if not (config.teacher and config.data):
                raise ValueError("give --cache, or --teacher and --data for the online baseline")
            self.teacher_spec = config.teacher
            self.teacher_model = load_causal_lm(config.teacher, "fp32", str(device), config.trust_remote_code)
            self.n_teacher = n_layers(self.teacher_model)
            self.teacher_dim = hidden_size(self.teacher_model)
            self.available = list(range(self.n_teacher + 1))
            self.head = output_head(self.teacher_model)
            self.final_norm = final_norm(self.teacher_model)
            self.tokenizer_sha = None

    @property
    def cached(self) -> bool:
        return self.teacher_model is None

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

    def batches(self, tokenizer, layers: list[int], own_tokenizer: bool, part: tuple[int, int] = (0, 1)):
        """The run's batches; `part` = (rank, world): this rank's share of each global batch (offline only)."""
        c = self.config
        if self.cached:
            teacher_pad = self.reader.meta["tokenizer"]["pad_token_id"] or 0
            loaders = [CacheBatches(reader, c.batch_size, layers, c.seed + i, teacher_pad,
                                    student_tokenizer=tokenizer if own_tokenizer else None, part=part)
                       for i, reader in enumerate(self.readers)]
            return MixedBatches(loaders, self.weights, [cache_role(r) for r in self.readers])
        return OnlineBatches(self.teacher_model, tokenizer, c.data, c.batch_size, layers, c.seed, self.device,
                             c.max_length, c.max_prompt_length)
