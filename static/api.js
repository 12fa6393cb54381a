// Talking to the server (app/web/): JSON in and out, and the token stream of /generate_stream.
// Every error arrives as {"error": "...", "field": "..."} and becomes an Error with those two.

export async function api(method, path, body) {
  const opts = {method, headers: {}};
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({error: `${r.status} ${r.statusText}`}));
  if (!r.ok) throw apiError(r.status, data);
  return data;
}

export function apiError(status, data) {
  const e = new Error(data.error || `HTTP ${status}`);
  e.status = status;
  e.field = data.field;
  return e;
}

// path pieces are names the user typed: escaped
export const path = (...parts) => "/" + parts.map(encodeURIComponent).join("/");

// Server-Sent Events over fetch (EventSource cannot POST): blocks separated by a blank line
export async function readEvents(response, onEvent) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const type = (block.match(/^event: (.*)$/m) || [, "message"])[1];
      const data = block.split("\n").filter(l => l.startsWith("data: ")).map(l => l.slice(6)).join("\n");
      if (data) onEvent(type, JSON.parse(data));  // a block of only ": ping" comments keeps the connection alive
    }
  }
}
