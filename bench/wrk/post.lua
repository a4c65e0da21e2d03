-- wrk script of `make bench` (bench/run.py): POSTs one prepared body, over and over.
--
--   BENCH_BODY=<file> BENCH_OUT=<file.json> [BENCH_MODEL_HEADER=<model>] \
--     wrk -t1 -c C -d Ds --timeout 30s -s bench/wrk/post.lua http://127.0.0.1:PORT/v1/chat/completions
--
-- The body is read once per Lua state and the request is built once by wrk (no request() or
-- response() callback is defined, so wrk keeps its static-request fast path and the client
-- costs the same for every configuration). wrk adds Content-Length itself. With
-- BENCH_MODEL_HEADER the request carries x-gateway-base-model-name: the no-inspection
-- baseline routes on it. done() writes the summary and latency percentiles as JSON.

local body_path = os.getenv("BENCH_BODY")
local f = assert(io.open(body_path, "rb"), "cannot open BENCH_BODY " .. tostring(body_path))
local body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
local model_header = os.getenv("BENCH_MODEL_HEADER")
if model_header and model_header ~= "" then
  wrk.headers["x-gateway-base-model-name"] = model_header
end

function done(summary, latency, requests)
  local e = summary.errors
  local pct = {}
  for _, p in ipairs({ 50, 90, 99, 99.9 }) do
    pct[#pct + 1] = string.format('"%s":%d', tostring(p), latency:percentile(p))
  end
  local json = string.format(
    '{"duration_us":%d,"requests":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"max":%d,"mean":%.3f,"stdev":%.3f,"percentiles":{%s}}}',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev, table.concat(pct, ","))
  local out = assert(io.open(os.getenv("BENCH_OUT"), "w"))
  out:write(json, "\n")
  out:close()
end
