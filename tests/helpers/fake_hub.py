"""A loopback stand-in for the Hub's HTTP API, for `push_to_hub` tests: no request leaves the machine.

huggingface_hub sends every Hub request through one shared `httpx2.Client` made by a replaceable factory
(`huggingface_hub.set_client_factory`). [`fake_hub_client`] installs a client whose `httpx2.MockTransport` answers the
endpoints `create_repo`, `upload_folder` and `datasets.Dataset.push_to_hub` call, as the Hub does for a new, empty
repository, and records every commit (its files decoded, LFS files too), so tests assert on the exact bytes that were uploaded.
"""

import base64
import contextlib
import json
import re

import httpx2
import huggingface_hub


COMMIT_OID = "a" * 40
LFS_STORE = "https://huggingface.co/fake-lfs-store"
LFS_SUFFIXES = (".parquet",)  # uploaded through LFS, as the Hub asks for data files; everything else inline


class FakeHub:
    """Plays the Hub's side for models and datasets. ``commits`` holds ``{"repo", "header", "files", "lfs"}`` (path: bytes)."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.lfs_objects: dict[str, bytes] = {}

    def _repo_info(self, repo_id: str) -> httpx2.Response:
        if not any(f"{entry.get('organization')}/{entry['name']}" == repo_id for entry in self.created):
            return httpx2.Response(
                404, json={"error": "Repository not found"}, headers={"X-Error-Code": "RepoNotFound"}
            )
        return httpx2.Response(200, json={"id": repo_id, "sha": COMMIT_OID, "siblings": [], "private": False})

    def _commit(self, repo_id: str, content: bytes) -> httpx2.Response:
        lines = [json.loads(line) for line in content.decode().splitlines() if line.strip()]
        self.commits.append(
            {
                "repo": repo_id,
                "header": next(line["value"] for line in lines if line["key"] == "header"),
                "files": {
                    line["value"]["path"]: base64.b64decode(line["value"]["content"])
                    for line in lines
                    if line["key"] == "file"
                },
                "lfs": {
                    line["value"]["path"]: self.lfs_objects[line["value"]["oid"]]
                    for line in lines
                    if line["key"] == "lfsFile"
                },
            }
        )
        return httpx2.Response(
            200, json={"commitUrl": f"https://huggingface.co/{repo_id}/commit/abc", "commitOid": COMMIT_OID,
                       "pullRequestUrl": None},
        )  # fmt: skip

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        if path == "/api/repos/create":
            entry = json.loads(request.content)
            self.created.append(entry)
            kind = "datasets/" if entry.get("type") == "dataset" else ""
            url = f"https://huggingface.co/{kind}{entry.get('organization')}/{entry['name']}"
            return httpx2.Response(200, json={"url": url})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if path.endswith("/info/lfs/objects/batch"):  # upload every LFS object to the fake store below
            objects = [
                {"oid": o["oid"], "size": o["size"], "actions": {"upload": {"href": f"{LFS_STORE}/{o['oid']}"}}}
                for o in json.loads(request.content)["objects"]
            ]
            return httpx2.Response(200, json={"transfer": "basic", "objects": objects})
        if str(request.url).startswith(LFS_STORE) and request.method == "PUT":
            self.lfs_objects[path.rsplit("/", 1)[1]] = request.read()
            return httpx2.Response(200)
        match = re.fullmatch(r"/api/(?:models|datasets)/([^/]+/[^/]+)(/.*)?", path)
        if match is None:
            return httpx2.Response(404, json={"error": f"unexpected request {request.method} {path}"})
        repo_id, rest = match.group(1), match.group(2) or ""
        if rest == "" or rest.startswith("/revision/"):
            return self._repo_info(repo_id)
        if rest.startswith("/preupload/"):
            files = json.loads(request.content)["files"]
            modes = [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                 "shouldIgnore": False}
                for f in files
            ]  # fmt: skip
            return httpx2.Response(200, json={"files": modes, "commitOid": COMMIT_OID})
        if rest.startswith("/commit/"):
            return self._commit(repo_id, request.content)
        if rest.startswith("/tree/"):  # a new repository: an empty root, no folders
            if rest.count("/") == 2:
                return httpx2.Response(200, json=[])
            return httpx2.Response(404, json={"error": "Entry not found"}, headers={"X-Error-Code": "EntryNotFound"})
        return httpx2.Response(404, json={"error": f"unexpected request {request.method} {path}"})


@contextlib.contextmanager
def fake_hub_client():
    """Route huggingface_hub's HTTP client to a fresh [`FakeHub`] for the duration; yield it."""
    hub = FakeHub()
    xet_disabled = huggingface_hub.constants.HF_HUB_DISABLE_XET
    huggingface_hub.constants.HF_HUB_DISABLE_XET = True  # upload through plain LFS, which the fake stores
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    try:
        yield hub
    finally:
        huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)
        huggingface_hub.constants.HF_HUB_DISABLE_XET = xet_disabled
