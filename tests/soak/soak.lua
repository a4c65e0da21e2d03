-- wrk script for the bbr-wasm soak and fail-over tests (tests/soak/).
--
--   wrk -t T -c C -d MAX --timeout 30s -s soak.lua URL -- QUOTA DONE_DIR SPEC_FILE
--
-- Every thread sends exactly QUOTA inference requests, cycling through the request kinds of
-- SPEC_FILE (one per line: index, path, model, base model, accepted backend ids separated
-- by commas, body; tab-separated). Once a thread has sent its quota its request() returns an
-- empty string: wrk writes nothing and the connection stays idle, so no extra request ever
-- reaches Envoy or a backend. Once it has read all its QUOTA responses it writes
-- DONE_DIR/done-<thread> and stops; the harness waits for every thread's file, then ends wrk
-- with SIGINT (wrk's -d is only the upper bound). So the client's counts are exact:
-- sent == answered, per kind, with nothing left in flight.
--
-- Each kind's body has its own length, and the mock echoes the number of body bytes it
-- received (x-echo-request-body-bytes): a 200 is matched to the request the client sent
-- without trusting the routing headers, then checked against them (x-echo-model-name,
-- x-echo-base-model-name) and against the backend that answered (x-mock-backend).
--
-- done() prints one line, "SOAK-RESULT {json}", that the harness parses.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

local function split(s, sep)
  local out = {}
  for part in (s .. sep):gmatch("(.-)" .. sep) do
    table.insert(out, part)
  end
  return out
end

function init(args)
  quota = tonumber(args[1])
  done_dir = args[2]
  kinds = {}
  by_len = {}
  for line in io.lines(args[3]) do
    local f = split(line, "\t")
    local k = {
      path = f[2], model = f[3], base = f[4], backends = {}, body = f[6],
    }
    for b in f[5]:gmatch("[^,]+") do
      k.backends[b] = true
    end
    k.request = wrk.format("POST", k.path, { ["Content-Type"] = "application/json" }, k.body)
    table.insert(kinds, k)
    by_len[tostring(#k.body)] = #kinds
  end
  n_kinds = #kinds
  sent, ok = {}, {}
  for i = 1, n_kinds do
    sent[i], ok[i] = 0, 0
  end
  n_sent, n_recv = 0, 0
  -- wrk 4.1 calls request() of its first thread once more, right after init() and before the
  -- thread starts, only to check that the string parses as HTTP (script_verify_request).
  -- That request is never sent, so that call is not counted.
  verify_call_pending = (tid == 1)
  statuses = {}          -- non-200 status -> count
  failed_json_503 = 0    -- 503 with the gateway's no_healthy_upstream JSON
  unattributed = 0       -- 200 whose body length matches no kind
  misrouted = 0          -- 200 from a backend or with headers that do not match the body
  by_backend = {}        -- backend id -> 200s
  finished = false
end

function request()
  if verify_call_pending then
    verify_call_pending = false
    return kinds[1].request
  end
  if n_sent >= quota then
    return ""
  end
  n_sent = n_sent + 1
  local i = ((n_sent - 1) % n_kinds) + 1
  sent[i] = sent[i] + 1
  return kinds[i].request
end

function response(status, headers, body)
  n_recv = n_recv + 1
  if status == 200 then
    local i = by_len[headers["x-echo-request-body-bytes"] or ""]
    local backend = headers["x-mock-backend"] or "?"
    by_backend[backend] = (by_backend[backend] or 0) + 1
    if i == nil then
      unattributed = unattributed + 1
    else
      local k = kinds[i]
      if k.backends[backend] and headers["x-echo-model-name"] == k.model
          and headers["x-echo-base-model-name"] == k.base then
        ok[i] = ok[i] + 1
      else
        misrouted = misrouted + 1
      end
    end
  else
    local key = tostring(status)
    statuses[key] = (statuses[key] or 0) + 1
    if status == 503 and body and body:find('"code":"no_healthy_upstream"', 1, true) then
      failed_json_503 = failed_json_503 + 1
    end
  end
  if n_recv >= quota and not finished then
    finished = true
    local f = io.open(done_dir .. "/done-" .. tid, "w")
    if f then
      f:write(tostring(n_recv))
      f:close()
    end
    wrk.thread:stop()
  end
end

local function encode(v)
  local t = type(v)
  if t == "table" then
    local parts, is_array = {}, (#v > 0)
    if is_array then
      for _, x in ipairs(v) do
        table.insert(parts, encode(x))
      end
      return "[" .. table.concat(parts, ",") .. "]"
    end
    for key, x in pairs(v) do
      table.insert(parts, string.format("%q", tostring(key)) .. ":" .. encode(x))
    end
    return "{" .. table.concat(parts, ",") .. "}"
  elseif t == "string" then
    return string.format("%q", v)
  elseif t == "boolean" then
    return tostring(v)
  elseif v == nil then
    return "null"
  else
    return string.format("%.17g", v)
  end
end

function done(summary, latency, requests)
  local per_thread = {}
  for _, thread in ipairs(threads) do
    table.insert(per_thread, {
      tid = thread:get("tid"),
      n_sent = thread:get("n_sent"),
      n_recv = thread:get("n_recv"),
      sent = thread:get("sent"),
      ok = thread:get("ok"),
      statuses = thread:get("statuses"),
      failed_json_503 = thread:get("failed_json_503"),
      unattributed = thread:get("unattributed"),
      misrouted = thread:get("misrouted"),
      by_backend = thread:get("by_backend"),
    })
  end
  local pct = {}
  for _, p in ipairs({ 50, 90, 99, 99.9 }) do
    pct[tostring(p)] = latency:percentile(p)
  end
  io.write("SOAK-RESULT " .. encode({
    duration_us = summary.duration,
    requests = summary.requests,
    bytes = summary.bytes,
    errors = summary.errors,
    latency_us = { min = latency.min, max = latency.max, mean = latency.mean,
                   stdev = latency.stdev, percentiles = pct },
    threads = per_thread,
  }) .. "\n")
end
