"""Upload a published output to the Hugging Face Hub (``output.push_to_hub``,
``--push-to-hub``, ``tadmerge push``).

What goes up is exactly the files the output's manifest lists, and the manifest:
never a staging directory, a lock or a stray file. The repo is created private
unless ``output.hub_private: false`` (an existing repo's visibility is left as it
is). The commit message names the merge and its plan fingerprint (config, every
input's version, the layout: what ``merge_report.json`` records); the commit
description gives the full fingerprint and the sha256 of ``merge_config.yaml``.

The upload is resumable: huggingface_hub >= 1.x's ``upload_folder`` (with
hf_xet, the default) commits in batches and a rerun skips what is already there;
where an older huggingface_hub has ``upload_large_folder`` (which takes no commit
message), that is used and the fingerprint is recorded as a tag
``tadmerge-<fingerprint[:12]>`` whose message is the commit message.

A repo that already holds weight files this output does not have (an older
single ``model.safetensors`` under new shards, ``pytorch_model*.bin``, a stale
index, an adapter, a ``.gguf``...) would serve them beside the new ones:
transformers prefers ``model.safetensors`` to shards and an adapter_config.json to
both. The push lists the repo first and refuses (OutputError, exit 2, before any
upload) naming them, unless told to replace them (``output.hub_replace_weights``,
``--replace-weights``): then they are deleted in the upload's first commit
(``upload_folder``'s ``delete_patterns``), so no revision mixes old and new
weights. Other files (README, eval results) are never deleted.

An output that fails `tadmerge verify` is not pushed: exit 3, as verify's. A
failure (no token, no network, refused) is a MergeRuntimeError (exit 4): the
output stays published locally and the message says how to retry
(``tadmerge push OUTPUT REPO``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from tadmerge.errors import ConfigError, MergeRuntimeError, OutputError, VerifyError

log = logging.getLogger("tadmerge")

__all__ = [
    "UploadPlan",
    "check_repo_id",
    "upload_plan",
    "describe",
    "push",
    "is_weight_file",
    "stale_weights",
    "list_remote",
]

# what a loader takes for a model's weights (or an adapter over them): a repo file of
# these kinds that the output does not have would be served beside the new weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")
ADAPTER_FILES = ("adapter_config.json",)

MANIFEST = "manifest.json"
REPORT = "merge_report.json"
CONFIG = "merge_config.yaml"


def check_repo_id(repo_id: object, key: str) -> str:
    """`repo_id` as huggingface_hub's own validator accepts it (ConfigError naming
    `key` otherwise)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or not repo_id:
        raise ConfigError(f"{key}: expected a Hugging Face repo id like org/name")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ConfigError(f"{key}: {repo_id!r} is not a valid Hugging Face repo id ({e})") from None
    return repo_id


@dataclass(frozen=True)
class UploadPlan:
    """Everything the upload will do, decided without the network."""

    repo_id: str
    private: bool
    folder: str  # the published version (a keep: N output's link resolved)
    files: tuple[tuple[str, int], ...]  # (path in the repo, size), the manifest's + itself
    fingerprint: str
    commit_message: str
    commit_description: str
    sha256: tuple[tuple[str, str], ...] = ()  # (path, sha256) the manifest records
    replace_weights: bool = False  # delete the repo's weights the output lacks

    @property
    def tag(self) -> str:
        return f"tadmerge-{self.fingerprint[:12]}"


def upload_plan(
    output: str,
    repo_id: str,
    private: bool,
    *,
    verify: bool = True,
    replace_weights: bool = False,
) -> UploadPlan:
    """What pushing `output` to `repo_id` uploads. `verify`: check every file against
    the manifest first (`tadmerge verify`; a mismatch is a VerifyError, exit 3, as
    `tadmerge verify` exits); a merge that just published skips it."""
    from .publish import read_manifest, verify_output

    folder = os.path.realpath(output)
    doc = read_manifest(folder)
    problems = verify_output(folder) if verify or doc is None else []
    if doc is None or problems:
        detail = "; ".join(problems[:5]) or "no tadmerge manifest.json"
        raise VerifyError(f"{output} is not a verified tadmerge output: {detail}")
    files = [(e["path"], int(e["size"])) for e in doc["files"]]
    files.append((MANIFEST, os.path.getsize(os.path.join(folder, MANIFEST))))
    try:
        with open(os.path.join(folder, REPORT), "rb") as f:
            report = json.loads(f.read(64 * 2**20))
    except (OSError, ValueError):
        report = {}
    fp = str(report.get("plan_fingerprint") or "")
    cfg = report.get("config") or {}
    method = (
        f"{cfg.get('merge', {}).get('method', '?')} + {cfg.get('sparsify', {}).get('method', '?')}"
    )
    try:
        with open(os.path.join(folder, CONFIG), "rb") as f:
            config_sha = hashlib.sha256(f.read()).hexdigest()
    except OSError:
        config_sha = "-"
    sha256 = tuple(sorted((e["path"], str(e.get("sha256", ""))) for e in doc["files"]))
    return UploadPlan(
        sha256=sha256,
        replace_weights=replace_weights,
        repo_id=repo_id,
        private=private,
        folder=folder,
        files=tuple(sorted(files)),
        fingerprint=fp,
        commit_message=f"tadmerge: {method} merge, plan {fp[:12]}",
        commit_description=(
            f"plan_fingerprint: {fp}\n{CONFIG} sha256: {config_sha}\n"
            f"tadmerge {report.get('tadmerge_version', '')}\n"
        ),
    )


def is_weight_file(path: str) -> bool:
    """`path` is what a loader may take for weights: a safetensors, pickle or gguf
    file, a shard index, or a PEFT adapter's config."""
    name = path.rsplit("/", 1)[-1]
    return name.endswith(WEIGHT_SUFFIXES) or name in ADAPTER_FILES


def stale_weights(remote: Iterable[str], paths: Iterable[str]) -> list[str]:
    """The repo's weight files (`remote`: every path in it) that the output (`paths`)
    does not have: what a loader could take instead of, or mix with, the new weights."""
    mine = set(paths)
    return sorted(p for p in remote if p not in mine and is_weight_file(p))


def list_remote(repo_id: str) -> list[str] | str:
    """Every path in `repo_id` on its default branch ([] for a repo that does not exist
    yet), or why it could not be listed (for `--dry-run`, which must not fail on it)."""
    from huggingface_hub import HfApi

    try:
        return list(HfApi().list_repo_files(repo_id, repo_type="model"))
    except Exception as exc:
        if "RepositoryNotFoundError" in {cls.__name__ for cls in type(exc).__mro__}:
            return []
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def describe_stale(
    stale: list[str] | str, repo_id: str, replace: bool, retry: str = ""
) -> list[str]:
    """`--dry-run`'s lines on the repo's weights the output lacks (`stale`, or why the
    repo could not be listed)."""
    if isinstance(stale, str):
        return [
            f"  the repo's files could not be listed ({stale}): the push lists them "
            "first and refuses if it holds weights this output does not have"
        ]
    if not stale:
        return [f"  {repo_id} holds no weights this output lacks: nothing to delete"]
    if replace:
        head = [f"  {len(stale)} weight file(s) in the repo that the output lacks, deleted "
                "in the upload's commit (--replace-weights):"]  # fmt: skip
        return head + [f"    would delete {p}" for p in stale]
    return [
        f"  the push would be refused (exit 2): the repo holds {len(stale)} weight file(s) "
        f"that the output lacks, {', '.join(stale[:20])}; --replace-weights "
        "(output.hub_replace_weights: true) deletes them in the upload's commit" + retry
    ]


def describe(plan: UploadPlan, remote: list[str] | str | None = None) -> str:
    """The upload in words (`--dry-run`): repo settings, message, every file and size,
    and with `remote` (the repo's paths, or why they could not be listed) the weights
    the push would delete or refuse over."""
    total = sum(size for _, size in plan.files)
    lines = [
        f"would upload {plan.folder} to https://huggingface.co/{plan.repo_id} "
        f"({'private' if plan.private else 'public'} if created; an existing repo's "
        "visibility is kept)",
        f"  commit message: {plan.commit_message}",
        f"  {len(plan.files)} file(s), {total / 1e9:.3f} GB:",
    ]
    lines += [f"    {size:>14d}  {path}" for path, size in plan.files]
    if remote is not None:
        stale = remote if isinstance(remote, str) else stale_weights(remote, _paths(plan))
        lines += describe_stale(stale, plan.repo_id, plan.replace_weights)
    return "\n".join(lines)


def _paths(plan: UploadPlan) -> list[str]:
    return [path for path, _ in plan.files]


def _retry_hint(plan: UploadPlan, replace: bool = False) -> str:
    return (
        f"the output is kept at {plan.folder}; retry with: tadmerge push {plan.folder} "
        f"{plan.repo_id}{'' if plan.private else ' --public'}"
        f"{' --replace-weights' if replace or plan.replace_weights else ''}"
    )


def already_there(api, plan: UploadPlan) -> bool:
    """The repo's newest commit is this output's (its message names the fingerprint)
    and holds every planned file with this content: an up-to-date nightly run has
    nothing to push. The title alone is not enough: huggingface_hub commits a large
    upload in batches, the first under this message, so an interrupted push leaves a
    repo whose newest commit names the plan while later files are missing or an
    older merge's."""
    try:
        commits = api.list_repo_commits(plan.repo_id)
        if not (plan.fingerprint and commits and plan.fingerprint[:12] in (commits[0].title or "")):
            return False
        paths = [path for path, _ in plan.files]
        infos = api.get_paths_info(plan.repo_id, paths, revision=commits[0].commit_id)
        remote = {getattr(i, "path", None): i for i in infos}
        sha = dict(plan.sha256)
        return all(_same_file(remote.get(p), plan.folder, p, sha.get(p)) for p in paths)
    except Exception:
        return False


def _same_file(info, folder: str, path: str, sha256: str | None) -> bool:
    """`info` (the hub's RepoFile) holds the local file `path`: the LFS sha256 (the
    manifest's where it has one), else the git blob id of the local bytes."""
    if info is None or getattr(info, "size", None) != os.path.getsize(os.path.join(folder, path)):
        return False
    lfs = getattr(info, "lfs", None)
    if lfs is not None:
        return lfs.sha256 == (sha256 or _file_hash(folder, path, "sha256"))
    return info.blob_id == _file_hash(folder, path, "git")


def _file_hash(folder: str, path: str, kind: str) -> str:
    full = os.path.join(folder, path)
    h = hashlib.sha256() if kind == "sha256" else hashlib.sha1()
    if kind == "git":
        h.update(b"blob %d\0" % os.path.getsize(full))
    with open(full, "rb") as f:
        while block := f.read(2**20):
            h.update(block)
    return h.hexdigest()


def push(plan: UploadPlan, *, skip_if_there: bool = False) -> str:
    """Create the repo (private unless told) and upload the planned files: the URL of
    the repo. Weights in the repo that the output lacks: OutputError (exit 2) before
    any upload, or with `plan.replace_weights` deleted in the upload's commit. Any
    other failure: MergeRuntimeError (exit 4) saying how to retry."""
    from huggingface_hub import HfApi

    api = HfApi()
    paths = _paths(plan)
    try:
        url = str(api.create_repo(plan.repo_id, private=plan.private, exist_ok=True))
        stale = stale_weights(api.list_repo_files(plan.repo_id, repo_type="model"), paths)
    except Exception as exc:
        raise _push_failed(plan, exc) from None
    if stale and not plan.replace_weights:
        raise OutputError(
            f"the hub repo {plan.repo_id} holds {len(stale)} weight file(s) that this output "
            f"does not have: {', '.join(stale[:20])}{' ...' if len(stale) > 20 else ''}; a "
            "loader would take them for, or mix them with, the new weights. Nothing was "
            "uploaded. Remove them, or replace them (deleted in the upload's commit; other "
            "files are kept) with output.hub_replace_weights: true or --replace-weights: "
            + _retry_hint(plan, replace=True)
        )
    try:
        if not stale and skip_if_there and already_there(api, plan):
            log.info(
                "%s already holds plan %s: nothing to push", plan.repo_id, plan.fingerprint[:12]
            )
            return url
        if stale:
            log.warning("deleting %d weight file(s) the output lacks from %s: %s",
                        len(stale), plan.repo_id, ", ".join(stale[:20]))  # fmt: skip
        log.info("uploading %d file(s) from %s to %s", len(paths), plan.folder, plan.repo_id)
        large = getattr(api, "upload_large_folder", None)
        if large is not None:  # (huggingface_hub < 1.x: takes no commit message)
            if stale:  # (it cannot delete: a commit of their own first, never a mix)
                from huggingface_hub import CommitOperationDelete

                api.create_commit(
                    plan.repo_id,
                    operations=[CommitOperationDelete(path_in_repo=p) for p in stale],
                    commit_message=f"tadmerge: remove weights that plan {plan.fingerprint[:12]} "
                    "replaces",
                    repo_type="model",
                )
            large(
                repo_id=plan.repo_id,
                folder_path=plan.folder,
                repo_type="model",
                private=plan.private,
                allow_patterns=paths,
            )
            api.create_tag(
                plan.repo_id, tag=plan.tag, tag_message=plan.commit_message, exist_ok=True
            )
        else:
            api.upload_folder(
                repo_id=plan.repo_id,
                folder_path=plan.folder,
                repo_type="model",
                commit_message=plan.commit_message,
                commit_description=plan.commit_description,
                allow_patterns=paths,
                # (these exact paths, escaped: deleted in the first commit, with the upload)
                delete_patterns=[glob.escape(p) for p in stale] or None,
            )
    except Exception as exc:
        raise _push_failed(plan, exc) from None
    return url


def _push_failed(plan: UploadPlan, exc: Exception) -> MergeRuntimeError:
    kinds = {cls.__name__ for cls in type(exc).__mro__}
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if "LocalTokenNotFoundError" in kinds or "401" in detail:
        why = "no valid Hugging Face token (run `hf auth login` or set HF_TOKEN)"
    else:
        why = f"{type(exc).__name__}: {detail}"
    return MergeRuntimeError(
        f"pushing to the hub repo {plan.repo_id} failed: {why}; {_retry_hint(plan)}"
    )
