"""Hub push with the real huggingface_hub client against a local fake Hub on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from acttail_export.config import ActTailConfig, ProjectionConfig
from acttail_export.errors import ActTailError
from acttail_export.hub import push_to_hub
from acttail_export.model_card import write_model_card

TOKEN = "hf_testTOKEN0123456789abcdefSECRET"


class FakeHub:
    """The three endpoints ``create_repo`` + ``upload_folder`` use (regular, non-LFS uploads)."""

    def __init__(self, fail_commit: bool = False):
        self.repos: dict[str, dict] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.auth: list[str | None] = []
        self.validated: list[str] = []
        self.fail_commit = fail_commit
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802
                hub.auth.append(self.headers.get("authorization"))
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:3] == ["api", "repos", "create"]:
                    req = json.loads(body)
                    repo = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    if repo in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo}"})
                    # huggingface_hub < 1 sends "private": bool, 1.x and later "visibility": "private" | "public"
                    private = req["private"] if "private" in req else (req["visibility"] == "private" if "visibility" in req else None)
                    hub.repos[repo] = {"private": private}
                    hub.files[repo] = {}
                    return self._reply(200, {"url": f"{hub.url}/{repo}"})
                if parts == ["api", "validate-yaml"]:  # model card metadata check before the commit
                    hub.validated.append(json.loads(body)["content"])
                    return self._reply(200, {"errors": [], "warnings": []})
                if parts[:2] == ["api", "models"] and "preupload" in parts:
                    req = json.loads(body)
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                       for f in req["files"]]})
                if parts[:2] == ["api", "models"] and "commit" in parts:
                    repo = "/".join(parts[2:parts.index("commit")])
                    if hub.fail_commit:
                        return self._reply(500, {"error": "internal error"})
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            hub.files[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    return self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/abc", "commitOid": "a" * 40})
                return self._reply(404, {"error": f"unexpected {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def export_folder(tmp_path) -> Path:
    """A small export-like folder with a subfolder and a config/card that must not contain the token."""
    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(bytes(range(256)) * 40)
    (folder / "sub" / "notes.txt").write_text("nested file\n")
    config = ActTailConfig(target_sparsity=0.5, model="tiny", projections=[
        ProjectionConfig(name="model.layers.0.mlp.down_proj", layer=0, kind="down_proj", in_features=8, out_features=4, sparsity=0.5)])
    config.save(folder)
    write_model_card(folder, config)
    return folder


@pytest.fixture
def hub_endpoint(monkeypatch):
    from huggingface_hub import constants

    def use(url: str):
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    return use


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_every_file_with_its_bytes(export_folder, hub_endpoint, caplog):
    with FakeHub() as hub, caplog.at_level(logging.DEBUG):
        hub_endpoint(hub.url)
        url = push_to_hub(export_folder, "me/tiny-acttail", token=TOKEN, private=True)
        push_to_hub(export_folder, "me/tiny-acttail", token=TOKEN)  # second push: repo exists (409) is fine
    assert url.endswith("/commit/abc")
    assert hub.repos["me/tiny-acttail"]["private"] is True
    assert hub.files["me/tiny-acttail"] == _tree(export_folder)  # subfolders kept, exact bytes
    assert set(hub.auth) == {f"Bearer {TOKEN}"}
    assert hub.validated and all(TOKEN not in card for card in hub.validated)
    assert TOKEN not in caplog.text
    for name in ("README.md", "acttail_config.json"):
        assert TOKEN not in (export_folder / name).read_text()


def test_failed_push_keeps_export_and_says_how_to_retry(export_folder, hub_endpoint, caplog):
    before = _tree(export_folder)
    with FakeHub(fail_commit=True) as hub, caplog.at_level(logging.DEBUG):
        hub_endpoint(hub.url)
        with pytest.raises(ActTailError) as err:
            push_to_hub(export_folder, "me/tiny-acttail", token=TOKEN)
    message = str(err.value)
    assert "huggingface-cli upload me/tiny-acttail" in message and str(export_folder) in message
    assert "\n" not in message and TOKEN not in message and TOKEN not in caplog.text
    assert _tree(export_folder) == before


def test_push_without_network(export_folder, hub_endpoint):
    hub_endpoint("http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(ActTailError, match="retry with `huggingface-cli upload") as err:
        push_to_hub(export_folder, "me/x", token=TOKEN)
    assert TOKEN not in str(err.value)


def test_push_without_token(export_folder, hub_endpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ActTailError, match="needs a token: pass --token, set HF_TOKEN"):
        push_to_hub(export_folder, "me/x")


@pytest.mark.parametrize("repo", ["a/b/c", "me/two--dashes", "me/with space", "me/-x", ""])
def test_invalid_repo_id_is_refused_before_any_request(repo, export_folder, hub_endpoint):
    with FakeHub() as hub:
        hub_endpoint(hub.url)
        with pytest.raises(ActTailError, match="invalid Hub repo id .*use NAME or ORG/NAME") as err:
            push_to_hub(export_folder, repo, token=TOKEN)
    assert "\n" not in str(err.value)
    assert hub.auth == [] and hub.repos == {}
