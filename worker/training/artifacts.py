"""A trained adapter's files, made portable and stored: the peft directory under the team's
adapters prefix, and a .tar.gz of it for download. No torch here."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from app.core.ids import new_id
from app.core.storage import get_storage
from app.domains.adapters import service as adapters
from app.domains.jobs.lease import StoredAdapter


def store_adapter(adapter_dir: Path, *, team_id: str, base_model: str, work_dir: Path) -> StoredAdapter:
    """Make the saved adapter portable, then store its files and an archive of them (built in
    work_dir). Not recorded yet: jobs.lease.finish_training does that, or deletes the files."""
    _make_portable(adapter_dir, base_model)
    adapter_id = new_id("ftadapter")
    prefix = adapters.storage_prefix(team_id=team_id, adapter_id=adapter_id)
    storage = get_storage()
    archive = work_dir / "adapter.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(adapter_dir.iterdir()):
            tar.add(path, arcname=path.name)
    storage.put_tree(adapter_dir, adapters.files_prefix(prefix))
    blob = storage.put_file(archive, adapters.archive_key(prefix))
    return StoredAdapter(id=adapter_id, storage_prefix=prefix, archive_key=blob.key, bytes=blob.bytes,
                         sha256=blob.sha256)


def _make_portable(adapter_dir: Path, base_model: str) -> None:
    """Name the base by its registered name, not this worker's path, and drop peft's template model
    card (it repeats that path): the adapter is downloaded and served elsewhere."""
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_model
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    (adapter_dir / "README.md").unlink(missing_ok=True)
