"""What the workspace exposes, and to whom: who may read its files (a shared host's other users), what
`histcode view` opens to the network, and whether the foundation encoders registered here are the published
weights (a verified digest), weights nobody can vouch for (no published digest known) or other weights taken on
purpose (``--allow-other-weights``).

Reads only: modes are looked at with ``lstat``, registered versions through their tags.
"""

from __future__ import annotations

import stat
from pathlib import Path

from histcode.config import HistcodeConfig
from histcode.doctor.finding import OK, WARN, Finding
from histcode.workspace import PRIVATE_ENV, Workspace, open_entries, wants_private

AREA = "exposure"
SECURE_FIX = (f"`histcode workspace secure` (folders 0700, files 0600), then `workspace.private: true` in "
              f"params.yaml (or {PRIVATE_ENV}=1) so that new files are owner-only too")


def _mode(path: Path) -> str:
    try:
        return f"{stat.S_IMODE(path.lstat().st_mode):04o}"
    except OSError:
        return "?"


def permission_checks(ws: Workspace, cfg: HistcodeConfig) -> list[Finding]:
    """The workspace's stores (catalog, lancedb, mlruns, outputs) readable by the group or others: a warning
    naming the paths and the fix. A root folder closed to them (no group/other bits) keeps everything below
    private whatever the modes inside."""
    private = wants_private(cfg)
    setting = ("workspace.private is on: new files are owner-only" if private else
               f"workspace.private is off (and {PRIVATE_ENV} unset): new files follow the shell's umask")
    if not ws.root.is_dir():
        return [Finding(AREA, f"permissions of {ws.root}", OK, f"no workspace yet; {setting}")]
    if not stat.S_IMODE(ws.root.stat().st_mode) & 0o077:
        return [Finding(AREA, f"permissions of {ws.root}", OK,
                        f"the workspace folder is owner-only ({_mode(ws.root)}): other users cannot read below it; "
                        + setting)]
    exposed = [p for p in open_entries(ws) if p != ws.root]
    if not exposed:
        return [Finding(AREA, f"permissions of {ws.root}", OK,
                        f"no store file or folder is readable by the group or others; {setting}")]
    stores = (ws.catalog_path, ws.lancedb_dir, ws.mlruns_dir)
    named = [p for p in stores if p in exposed] or exposed
    shown = ", ".join(f"{p} ({_mode(p)})" for p in named[:3])
    return [Finding(AREA, f"permissions of {ws.root}", WARN,
                    f"{len(exposed)} files and folders of the workspace are readable by the group or others on "
                    f"this host (patient ids, labels, models), e.g. {shown}; {setting}", SECURE_FIX)]


def viewer_check() -> Finding:
    """What `histcode view` opens: the loopback address unless told otherwise (the command enforces it)."""
    return Finding(AREA, "histcode view", OK,
                   "binds 127.0.0.1 by default and answers only requests naming a loopback host (--allowed-host "
                   "adds one); a --host the network can reach is refused without --public, which then requires a "
                   "token (made and printed, --token or $HISTCODE_VIEW_TOKEN) or a reverse proxy's --auth-header; "
                   "TLS is left to the proxy")


def foundation_weight_checks(client, cfg: HistcodeConfig) -> list[Finding]:
    """Each foundation encoder version registered here: its weights' digest against the registry's published
    ones (compared again now, so a digest added to the registry after the registration counts)."""
    from histcode.ssl.foundation import FOUNDATION
    from histcode.ssl.modules import FOUNDATION_PREFIX
    from histcode.ssl.weights import ALLOW_OTHER, known_digests
    from histcode.tracking import quote

    name = cfg.pretrain.register_as
    try:
        versions = client.search_model_versions(f"name = {quote(name)}")
    except Exception:  # noqa: BLE001 -- no encoder model yet: nothing registered to vouch for
        return []
    findings = []
    for v in sorted(versions, key=lambda v: int(v.version)):
        tags = v.tags or {}
        encoder = tags.get("encoder", "")
        if not encoder.startswith(FOUNDATION_PREFIX):
            continue
        item = f"{name} version {v.version} ({encoder.removeprefix(FOUNDATION_PREFIX)})"
        spec = FOUNDATION.get(encoder.removeprefix(FOUNDATION_PREFIX))
        sha, file = tags.get("weights_sha256", ""), Path(tags.get("weights_file", ""))
        known = known_digests(spec, file) if spec is not None else ()
        if tags.get("weights_check") == "override":
            findings.append(Finding(AREA, item, WARN, f"registered with {ALLOW_OTHER}: its weights (sha256 {sha}) "
                                    "are not the published file; fine for a fine-tuned copy you made",
                                    "register the published weights if this was not meant"))
        elif sha and sha in known:
            findings.append(Finding(AREA, item, OK, f"weights verified: sha256 {sha} is the published file's"))
        elif known:
            findings.append(Finding(AREA, item, WARN, f"weights sha256 {sha} is not the published file's "
                                    f"({' or '.join(known)}) and no override was given",
                                    f"register the published weights again (`histcode encoders register`), or "
                                    f"with {ALLOW_OTHER} if these are meant"))
        else:
            card = spec.card if spec is not None else "its model card"
            findings.append(Finding(AREA, item, WARN, f"no published digest known: its weights' sha256 is {sha}",
                                    f"check it against the model card ({card})"))
    return findings


def exposure_checks(ws: Workspace, cfg: HistcodeConfig, client) -> list[Finding]:
    findings = permission_checks(ws, cfg)
    findings.append(viewer_check())
    if client is not None:
        findings += foundation_weight_checks(client, cfg)
    return findings
