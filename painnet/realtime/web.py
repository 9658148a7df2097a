"""The live plot: a small page served on 127.0.0.1, redrawn twice a second.

``GET /`` is a self-contained HTML page (no external scripts: scanner consoles are offline) that
polls ``GET /estimates.json?since=N`` and draws the estimates against time as SVG: each volume's
estimate (thin) and their causal 10-s running mean (thick, also shown in large type), with
censored and missing volumes marked; the y axis spans [0, 1] widened to the 2nd–98th
percentiles of the estimates.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from painnet.realtime.outputs import LiveState

log = logging.getLogger(__name__)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>painnet real-time</title>
<style>
body{font-family:system-ui,sans-serif;margin:16px 24px;background:#fafafa;color:#222}
h1{font-size:18px;margin:0 0 4px} #meta{color:#666;font-size:13px}
#now{font-size:44px;font-weight:600;margin:6px 0} #now small{font-size:15px;color:#666}
svg{background:#fff;border:1px solid #ddd} .axis{stroke:#999} .lab{font-size:11px;fill:#666}
</style></head><body>
<h1 id="title">painnet real-time</h1><div id="meta">waiting for volumes…</div>
<div id="now">–</div>
<svg id="plot" width="900" height="300"></svg>
<script>
const W=900,H=300,L=48,R=12,T=12,B=34,SMOOTH_S=10;let rows=[],next=0,tr=1;
function pct(v,q){const s=[...v].sort((a,b)=>a-b);return s.length?s[Math.min(s.length-1,Math.floor(q*s.length))]:0}
function smooth(){const out=[];let sum=0,n=0,j=0;const k=Math.max(1,Math.round(SMOOTH_S/tr));
  for(let i=0;i<rows.length;i++){if(rows[i][2]!==null){sum+=rows[i][2];n++}
    while(i-j>=k){if(rows[j][2]!==null){sum-=rows[j][2];n--}j++}
    out.push(n&&rows[i][2]!==null?sum/n:null)}return out}
function line(vals,x,y){let d='',pen=false;rows.forEach((r,i)=>{const v=vals[i];if(v===null){pen=false;return}
  d+=(pen?'L':'M')+x(r[1]).toFixed(1)+','+y(v).toFixed(1);pen=true});return d}
function draw(){
  const svg=document.getElementById('plot');const n=rows.length;
  const tmax=Math.max(60,n?rows[n-1][1]+tr:60);const x=t=>L+(W-L-R)*t/tmax;
  const raw=rows.map(r=>r[2]),vals=raw.filter(v=>v!==null),sm=smooth();
  const lo=Math.min(0,pct(vals,0.02)),hi=Math.max(1,pct(vals,0.98));
  const y=v=>T+(H-T-B)*(hi-Math.min(hi,Math.max(lo,v)))/(hi-lo);
  let g='';for(const v of [lo,(lo+hi)/2,hi]){g+=`<line class="axis" x1="${L}" x2="${W-R}" y1="${y(v)}" y2="${y(v)}" stroke-dasharray="2,3"/><text class="lab" x="4" y="${y(v)+4}">${v.toFixed(2)}</text>`}
  const step=tmax>600?120:tmax>240?60:30;
  for(let t=0;t<=tmax;t+=step){g+=`<text class="lab" x="${x(t)-8}" y="${H-B+16}">${t}s</text>`}
  g+=`<text class="lab" x="${W/2-40}" y="${H-4}">time (s)</text>`;
  for(const r of rows){if(r[4]==='missing'||r[4]==='corrupt'){g+=`<rect x="${x(r[1])}" y="${T}" width="2" height="${H-T-B}" fill="#e55" opacity="0.5"/>`}
    else if(r[3]&&r[4]!=='dropped'){g+=`<rect x="${x(r[1])}" y="${H-B-6}" width="2" height="6" fill="#f90"/>`}}
  g+=`<path d="${line(raw,x,y)}" fill="none" stroke="#e8a39b" stroke-width="1"/>`;
  g+=`<path d="${line(sm,x,y)}" fill="none" stroke="#c0392b" stroke-width="2.4"/>`;
  g+=`<text class="lab" x="${W-R-210}" y="${T+12}"><tspan fill="#e8a39b">━ per volume</tspan>  <tspan fill="#c0392b">━ ${SMOOTH_S}-s mean</tspan>  <tspan fill="#f90">▮ censored</tspan></text>`;
  svg.innerHTML=g;
  let i=n-1;while(i>=0&&sm[i]===null)i--;
  document.getElementById('now').innerHTML=i>=0?`${sm[i].toFixed(2)} <small>${SMOOTH_S}-s mean · last ${raw[i].toFixed(2)} · volume ${rows[i][0]} · ${rows[i][1].toFixed(1)} s</small>`:'–';
  const gaps=rows.filter(r=>r[4]==='missing'||r[4]==='corrupt').length,cens=rows.filter(r=>r[4]==='censored').length;
  document.getElementById('meta').textContent=`${n} volumes · ${cens} censored · ${gaps} missing/corrupt`;
}
async function poll(){try{const res=await fetch('estimates.json?since='+next);const s=await res.json();
  tr=s.tr;document.getElementById('title').textContent=s.title;rows=rows.concat(s.rows);next=s.next;draw();
  if(s.finished){document.getElementById('meta').textContent+=' · stream ended'}}catch(e){}
  setTimeout(poll,500)}
poll();
</script></body></html>
"""


class LiveServer:
    """HTTP server on ``host:port`` (port 0: a free one) in a daemon thread."""

    def __init__(self, state: LiveState, port: int = 8765, host: str = "127.0.0.1"):
        handler = _handler(state)
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def start(self) -> LiveServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _handler(state: LiveState):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urlparse(self.path)
            if url.path in ("/", "/index.html"):
                self._send(PAGE.encode(), "text/html; charset=utf-8")
            elif url.path == "/estimates.json":
                since = parse_qs(url.query).get("since", ["0"])[0]
                since_n = int(since) if since.isdigit() else 0
                body = json.dumps(state.snapshot(since_n)).encode()
                self._send(body, "application/json")
            else:
                self.send_error(404)

        def _send(self, body: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's name)
            log.debug("web: " + format, *args)

    return Handler
