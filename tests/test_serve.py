"""The search service: real HTTP on loopback (uvicorn in a thread, and the CLI in a subprocess), the batcher, bad
input, image serving and path traversal, and the web page in a real headless Chromium (Debian's chromium and
chromium-driver, driven by Selenium; skipped, saying why, where they are not installed)."""

import asyncio
import concurrent.futures
import dataclasses
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from uit_jax import export, retrieval, serve
from uit_jax.data import synthetic as syn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(REPO, "uit_jax", "assets", "clip-mini-synthetic")
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
PEOPLE = 32


@dataclasses.dataclass
class Gallery:
    root: str  # tmp folder
    model: str  # exported model folder
    folder: str  # the gallery (images in two subfolders)
    index_path: str
    retriever: retrieval.Retriever
    index: retrieval.Index
    captions: list  # one per person, in index order
    planted: int  # the row whose caption the model ranks first by the widest margin
    other: int  # a second person with a caption ranked first (for the side-by-side pane)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Gallery:
    """32 synthetic people (one view each) in two subfolders, the shipped mini CLIP exported as a model folder
    (zero-shot), and the index of the folder. The planted person is the one whose own caption the model ranks
    first by the widest margin, so the page tests check the page, not the model's luck."""
    root = tmp_path_factory.mktemp("serve")
    zs = retrieval.Retriever.load(MINI, image_size=(128, 64))
    model = str(root / "model")
    config = dataclasses.asdict(zs.model.config)
    export.write_folder(model, zs.params, config, zs.tokenizer, zs.image_size, zs.mean, zs.std, {"source": MINI})
    r = retrieval.Retriever.load(model)
    assert r.fingerprint == zs.fingerprint
    folder = root / "gallery"
    captions = {}
    for i in range(PEOPLE):
        ident = syn.sample_identity(np.random.default_rng([7, i]))
        sub = folder / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"person_{i:02d}.png"
        Image.fromarray(syn.render_image(ident, np.random.default_rng([7, i, 1]), 128, 64, "crop")).save(path)
        captions[str(path)] = syn.make_caption(ident, np.random.default_rng([7, i, 8]))
    index = r.index_folder(str(folder), batch_size=16)
    index_path = str(root / "index")
    index.save(index_path)
    caps = [captions[p] for p in index.paths]
    s = r.encode_text(caps) @ index.embeddings.T  # (people, people): caption i against image j
    own = np.diag(s)
    margin = own - np.where(np.eye(len(s), dtype=bool), -np.inf, s).max(1)
    planted, other = (int(i) for i in np.argsort(-margin)[:2])
    assert margin[planted] > 0.05 and margin[other] > 0, margin  # the model ranks both first, clearly
    return Gallery(str(root), model, str(folder), index_path, r, index, caps, planted, other)


@pytest.fixture(scope="module")
def server(gallery):
    service = serve.Service(gallery.retriever, gallery.index)
    service.warm_up()
    with serve.Server(serve.create_app(service)) as s:
        s.service = service
        yield s
    service.close()


def _request(url, method="GET", path="/", body=None, raw_path=False):
    """(status, headers, bytes) over a fresh loopback connection; the path is sent as given (no normalisation)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    data = body if isinstance(body, (bytes, str)) or body is None or hasattr(body, "__next__") else json.dumps(body)
    conn.request(method, path, body=data, headers=headers, encode_chunked=hasattr(data, "__next__"))
    res = conn.getresponse()
    out = res.status, dict(res.getheaders()), res.read()
    conn.close()
    return out


def _post(url, body):
    status, _, data = _request(url, "POST", "/search", body)
    return status, json.loads(data)


def _id(gallery, row):
    return os.path.relpath(gallery.index.paths[row], gallery.folder).replace(os.sep, "/")


# ----------------------------------------------------------------------------------------------- the API
def test_health_docs_and_page(server, gallery):
    status, _, data = _request(server.url, path="/health")
    h = json.loads(data)
    assert status == 200 and h["index_size"] == PEOPLE and h["search"] == "exact" and h["text_tokens"] == 54
    assert h["model_fingerprint"] == gallery.retriever.fingerprint and "cpu" in h["device"]
    spec = json.loads(_request(server.url, path="/openapi.json")[2])
    assert {"/search", "/images/{image_id}", "/health"} <= set(spec["paths"])
    docs = _request(server.url, path="/docs")[2].decode()
    assert "cdn" not in docs and "/static-offline-docs/swagger-ui-bundle.js" in docs  # served offline
    assert _request(server.url, path="/static-offline-docs/swagger-ui-bundle.js")[0] == 200
    page = _request(server.url, path="/")[2].decode()
    assert "/static/app.js" in page and "http" not in page  # no external resources
    for asset in ("app.js", "app.css"):
        status, headers, data = _request(server.url, path=f"/static/{asset}")
        assert status == 200 and b"http://" not in data and b"https://" not in data


def test_search_ranks_like_the_library(server, gallery):
    q = [gallery.captions[gallery.planted], gallery.captions[gallery.other]]
    status, out = _post(server.url, {"queries": q, "k": 5})
    assert status == 200 and out["k"] == 5 and out["index_size"] == PEOPLE and len(out["results"]) == 2
    want = gallery.index.search(gallery.retriever.encode_text(q), k=5)
    for res, row, text in zip(out["results"], want, q, strict=True):
        assert res["query"] == text and not res["truncated"] and res["note"] is None
        assert [h["rank"] for h in res["hits"]] == [1, 2, 3, 4, 5]
        assert [h["id"] for h in res["hits"]] == [os.path.relpath(p, gallery.folder) for p, _ in row]
        np.testing.assert_allclose([h["score"] for h in res["hits"]], [s for _, s in row], atol=1e-5)
        assert all(h["url"] == "/images/" + h["id"] and h["thumb"] == h["url"] + "?size=thumb" for h in res["hits"])
    assert out["results"][0]["hits"][0]["id"] == _id(gallery, gallery.planted)
    assert out["results"][1]["hits"][0]["id"] == _id(gallery, gallery.other)


def test_images_and_thumbnails(server, gallery):
    image_id = _id(gallery, gallery.planted)
    status, headers, data = _request(server.url, path="/images/" + image_id)
    assert status == 200 and headers["content-type"] == "image/png"
    assert data == open(gallery.index.paths[gallery.planted], "rb").read()
    status, headers, data = _request(server.url, path=f"/images/{image_id}?size=thumb")
    thumb = Image.open(io.BytesIO(data))
    assert status == 200 and headers["content-type"] == "image/jpeg" and thumb.size == (64, 128)


def test_bad_input_gets_a_4xx_that_says_what_to_change(server, gallery):
    url = server.url
    cases = [
        ({"queries": [], "k": 5}, 422, "non-empty list"),
        ({"queries": [""], "k": 5}, 422, "queries[0] is empty"),
        ({"queries": ["a man", "   \t "], "k": 5}, 422, "queries[1] is empty"),
        ({"queries": ["a man"], "k": 0}, 422, "at least 1"),
        ({"queries": ["a man"], "k": -3}, 422, "at least 1"),
        ({"queries": ["a man"], "k": PEOPLE + 1}, 422, f"ask for at most {PEOPLE}"),
        ({"queries": ["a man"], "k": "ten"}, 422, '"k"'),
        ({"queries": "a man", "k": 5}, 422, "wrap a single sentence in a list"),
        ({"queries": [3], "k": 5}, 422, "queries.0"),
        ({"k": 5}, 422, '"queries" is missing'),
        ({"query": ["a man"]}, 422, 'Unknown field "query"'),
        (["a man"], 422, "JSON object"),
        ('{"queries": ["a man"', 400, "not valid JSON"),
        ({"queries": ["a man"] * (serve.MAX_QUERIES + 1)}, 422, f"at most {serve.MAX_QUERIES}"),
        ({"queries": ["a" * (serve.MAX_CHARS + 1)]}, 422, f"at most {serve.MAX_CHARS}"),
    ]
    for body, code, message in cases:
        status, out = _post(url, body)
        assert status == code and message in out["detail"], (body, status, out)
    status, headers, data = _request(url, "POST", "/search", b"x" * (serve.MAX_BODY + 1))
    assert status == 413 and b"send at most" in data
    chunks = (b'{"queries": ["' + b"a" * 65536 for _ in range(serve.MAX_BODY // 65536 + 2))  # no Content-Length
    status, headers, data = _request(url, "POST", "/search", chunks)
    assert status == 413 and b"send at most" in data
    # No k: ten images (or the gallery's size where it holds fewer).
    status, out = _post(url, {"queries": ["a man"]})
    assert status == 200 and out["k"] == 10 and len(out["results"][0]["hits"]) == 10
    # Longer than the text encoder reads: answered, truncated, and said so.
    long = " ".join([gallery.captions[gallery.planted]] * 4)
    status, out = _post(url, {"queries": [long], "k": 3})
    res = out["results"][0]
    assert status == 200 and res["truncated"] and res["tokens"] > 54 and "reads the first 54" in res["note"]
    assert len(res["hits"]) == 3
    # Image ids: unknown, malformed size, and every way out of the gallery.
    with open(os.path.join(gallery.root, "secret.txt"), "w") as f:
        f.write("do not serve me")
    status, _, data = _request(url, path="/images/nobody.png")
    assert status == 404 and b"No image 'nobody.png' in this index" in data
    assert _request(url, path=f"/images/{_id(gallery, 0)}?size=huge")[0] == 422
    inside = _id(gallery, 0).split("/")[0]
    for attack in [
        "/images/../secret.txt",
        "/images/../../secret.txt",
        "/images/..%2Fsecret.txt",
        "/images/%2e%2e/secret.txt",
        f"/images/{inside}/../../secret.txt",
        f"/images/{inside}/..%2F..%2Fsecret.txt",
        "/images/" + urllib.parse.quote(os.path.join(gallery.root, "secret.txt"), safe=""),
        "/images//etc/passwd",
        "/images/%2Fetc%2Fpasswd",
        "/images/..%5Csecret.txt",
    ]:
        status, _, data = _request(url, path=attack)
        assert 400 <= status < 500 and b"do not serve me" not in data and b"root:" not in data, (attack, status)
    # ... and the server keeps serving.
    status, out = _post(url, {"queries": [gallery.captions[gallery.planted]], "k": 1})
    assert status == 200 and out["results"][0]["hits"][0]["id"] == _id(gallery, gallery.planted)


def test_concurrent_requests_are_batched_and_answered_right(server, gallery):
    queries = [[c] for c in gallery.captions[:16]]
    alone = [_post(server.url, {"queries": q, "k": 5})[1]["results"][0]["hits"] for q in queries]
    before = server.service.batcher.calls, server.service.batcher.requests
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda q: _post(server.url, {"queries": q, "k": 5})[1]["results"][0]["hits"], queries))
    assert server.service.batcher.requests - before[1] == 16
    assert server.service.batcher.calls - before[0] <= 16  # how many fewer depends on timing; see the next test
    for a, b in zip(alone, together, strict=True):
        assert [h["id"] for h in a] == [h["id"] for h in b]  # another padded batch size: float32 rounding only
        np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], atol=1e-5)


def test_batcher_takes_every_waiting_request_and_survives_errors():
    entered, release = threading.Event(), threading.Event()
    sizes = []

    def fn(ids, k):
        sizes.append(len(ids))
        if len(sizes) == 1:
            entered.set()
            release.wait(10)
        if (ids < 0).any():
            raise RuntimeError("bad batch")
        return ids[:, :1].astype(np.float32) * np.ones((1, k)), np.repeat(ids[:, :1], k, 1)

    b = serve.Batcher(fn, max_batch=6)
    first = b.submit(np.array([[1]]), 2)
    assert entered.wait(10)
    waiting = [b.submit(np.array([[10 + i], [20 + i]]), 1 + i) for i in range(4)]  # 8 sentences wait
    release.set()
    assert first.result(10)[1].tolist() == [[1, 1]]
    for i, f in enumerate(waiting):
        scores, idx = f.result(10)
        assert idx.tolist() == [[10 + i] * (1 + i), [20 + i] * (1 + i)]  # each gets its own rows and its own k
    assert sizes == [1, 6, 2]  # the three waiting together (max_batch 6 sentences), then the last
    assert b.calls == 3 and b.requests == 5
    with pytest.raises(RuntimeError, match="bad batch"):
        b.submit(np.array([[-1]]), 1).result(10)
    assert b.submit(np.array([[5]]), 1).result(10)[1].tolist() == [[5]]  # still serving
    b.close()


def test_a_symlink_out_of_the_gallery_is_found_but_not_served(gallery, tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    shutil.copy(gallery.index.paths[0], folder / "in.png")
    Image.fromarray(np.zeros((128, 64, 3), np.uint8)).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", folder / "link.png")
    index = gallery.retriever.index_folder(str(folder))
    service = serve.Service(gallery.retriever, index, gallery=str(folder))
    assert sorted(service.ids) == ["in.png", "link.png"]
    assert asyncio.run(service.search(["a man"]))["k"] == 2  # no k: the whole gallery when it holds fewer than ten
    with pytest.raises(ValueError, match="--max_batch=65: give 1"):
        serve.Service(gallery.retriever, index, max_batch=serve.MAX_QUERIES + 1)
    assert service.image_file("in.png") == str(folder / "in.png")
    with pytest.raises(serve.BadRequest, match="resolves outside the gallery"):
        service.image_file("link.png")
    # An indexed file outside --gallery gets an id that is never served.
    narrow = serve.Service(gallery.retriever, index, gallery=str(tmp_path / "nowhere"))
    assert sorted(narrow.ids) == ["#0", "#1"]
    with pytest.raises(serve.BadRequest, match="No image"):
        narrow.image_file("#0")
    service.close()
    narrow.close()


def test_an_index_of_another_model_is_refused_at_start_up(gallery, tmp_path, capsys):
    other = retrieval.Index(list(gallery.index.paths), gallery.index.embeddings, "0123456789abcdef")
    other.save(str(tmp_path / "other"))
    with pytest.raises(SystemExit) as e:
        serve.main([f"--model={gallery.model}", f"--index={tmp_path / 'other'}", "--port=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "another model" in err and "0123456789abcdef" in err and gallery.retriever.fingerprint in err
    with pytest.raises(SystemExit):
        serve.main([f"--model={gallery.model}", f"--index={tmp_path / 'missing'}", "--port=1"])
    assert "No index at" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- the page
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cli_server(gallery, tmp_path_factory):
    """`python -m uit_jax.serve` itself, in a subprocess, on a free loopback port."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("cli") / "serve.log", "w+")
    cmd = [sys.executable, "-m", "uit_jax.serve", f"--model={gallery.model}", f"--index={gallery.index_path}",
           f"--port={port}", "--access_log=0"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            if _request(url, path="/health")[0] == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"the server did not start:\n{log.read()[-3000:]}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(20)
    log.seek(0)
    out = log.read()
    assert f"compiled for batch sizes {serve.BATCH_SIZES}" in out, out[-2000:]


def _chrome(profile: str):
    """Selenium on Debian's chromium + chromium-driver (no driver or browser download), or skip saying why."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.skip(
            f"no browser: {', '.join(missing)} missing. Install Debian's chromium and chromium-driver (tools/test.sh "
            "does, as root, with apt-get when it can reach the distribution's packages)."
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.skip(f"selenium is not installed ({e}); pip install -r requirements-test.txt")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not try the network
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1500,1000"):  # fmt: skip
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def test_the_page_in_a_real_browser(cli_server, gallery, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _chrome(str(tmp_path / "profile"))
    wait = WebDriverWait(driver, 60)
    try:
        driver.get(cli_server + "/")
        wait.until(lambda d: "images" in d.find_element(By.ID, "status").text)
        assert f"{PEOPLE} images" in driver.find_element(By.ID, "status").text

        def search_in(pane_no, text, state):
            pane = driver.find_elements(By.CSS_SELECTOR, ".pane")[pane_no]
            box = pane.find_element(By.CSS_SELECTOR, "input")
            box.clear()
            box.send_keys(text)
            box.send_keys(Keys.ENTER)
            wait.until(lambda d: pane.get_attribute("data-state") == state)
            return pane

        def loaded(pane):  # every thumbnail fetched and decoded
            return driver.execute_script(
                "const im = arguments[0].querySelectorAll('.grid img');"
                "return im.length > 0 && Array.from(im).every(i => i.complete && i.naturalWidth > 0);",
                pane,
            )

        pane = search_in(0, gallery.captions[gallery.planted], "done")
        wait.until(lambda d: loaded(pane))
        imgs = pane.find_elements(By.CSS_SELECTOR, ".grid img")
        assert len(imgs) == 10
        first = urllib.parse.unquote(urllib.parse.urlsplit(imgs[0].get_attribute("src")).path)
        assert first == "/images/" + _id(gallery, gallery.planted)
        assert pane.find_element(By.CSS_SELECTOR, ".score").text.startswith("#1 0.")

        # Click to enlarge: the full image in a dialog; arrows move on; Esc closes and gives the focus back.
        pane.find_element(By.CSS_SELECTOR, ".thumb").click()
        viewer = driver.find_element(By.ID, "viewer")
        wait.until(lambda d: viewer.get_attribute("open") is not None)
        big = driver.find_element(By.ID, "viewer-img")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", big))
        assert big.get_attribute("src").endswith("/images/" + urllib.parse.quote(_id(gallery, gallery.planted)))
        assert "#1 of 10" in driver.find_element(By.ID, "viewer-caption").text
        driver.switch_to.active_element.send_keys(Keys.ARROW_RIGHT)
        wait.until(lambda d: "#2 of 10" in d.find_element(By.ID, "viewer-caption").text)
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", big))
        driver.save_screenshot(str(tmp_path / "search_viewer.png"))
        driver.switch_to.active_element.send_keys(Keys.ESCAPE)
        wait.until(lambda d: viewer.get_attribute("open") is None)
        assert "thumb" in driver.switch_to.active_element.get_attribute("class")

        # Keyboard only: Alt+N adds a query beside the first (focused), Enter searches it.
        driver.switch_to.active_element.send_keys(Keys.ALT, "n")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".pane")) == 2)
        assert driver.switch_to.active_element.get_attribute("type") == "search"
        second = search_in(1, gallery.captions[gallery.other], "done")
        wait.until(lambda d: loaded(second))
        src = urllib.parse.urlsplit(second.find_element(By.CSS_SELECTOR, ".grid img").get_attribute("src"))
        assert urllib.parse.unquote(src.path) == "/images/" + _id(gallery, gallery.other) and src.query == "size=thumb"

        # An empty query: the server's message, shown in the pane.
        driver.find_element(By.ID, "add").click()
        third = search_in(2, "   ", "error")
        error = third.find_element(By.CSS_SELECTOR, ".error")
        assert error.is_displayed() and "is empty" in error.text and "describe the person" in error.text
        shot = tmp_path / "search_page.png"
        driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 1000
        print(f"screenshot: {shot}")

        # The API docs render offline (Swagger UI served by the app).
        driver.get(cli_server + "/docs")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"))
        paths = {e.text.replace("\u200b", "") for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert {"/search", "/health"} <= paths
    finally:
        driver.quit()
