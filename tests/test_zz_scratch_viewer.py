import json, os, shutil, subprocess, sys, time, urllib.request, urllib.parse
from pathlib import Path
from histcode.viewer.serving import free_port


def test_scratch(headed_workspace, tmp_path):
    ws = tmp_path / "w"
    shutil.copytree(headed_workspace.root, ws)
    port = free_port()
    log = tmp_path / "strace.log"
    p = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=openat,mkdir,unlink,rename,creat,mkdirat,unlinkat,renameat,renameat2",
                          "-o", str(log), sys.executable, "-m", "histcode", "--workspace", str(ws), "view", "--port", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HISTCODE_CACHE_DIR": str(tmp_path / "c")})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/api/slides", timeout=5).read(); break
        except Exception:
            time.sleep(0.2)
    slides = json.loads(urllib.request.urlopen(url + "/api/slides").read())["slides"]
    sid = max((s for s in slides if s.get("tumor")), key=lambda s: s.get("p_tumor") or 0)["slide_id"]
    for path in ("/", "/slide?id=" + sid, "/api/slide?id=" + sid, "/api/overlay?layer=attention&id=" + sid, "/api/thumbnail?id=" + sid, "/api/similar?id=" + sid, "/api/survival-km.png"):
        try:
            urllib.request.urlopen(url + path, timeout=120).read()
        except Exception as e:
            print(path, e)
    time.sleep(3)
    child = int(open(f'/proc/{p.pid}/task/{p.pid}/children').read().split()[0])
    os.kill(child, 15); p.wait(60)
    lines = [l for l in log.read_text().splitlines() if str(ws) in l and ("O_CREAT" in l or "O_WRONLY" in l or "O_RDWR" in l or "mkdir" in l or "unlink" in l or "rename" in l)]
    Path("/tmp/strace_hits.txt").write_text("\n".join(lines))
