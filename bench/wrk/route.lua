-- One benchmark route for wrk: random post ids and page numbers, or a logged-in POST.
-- Arguments (after --): route maxid pages cookie

local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("seed", counter)
end

function init(args)
  route, maxid, pages, cookie = args[1], tonumber(args[2]), tonumber(args[3]), args[4]
  math.randomseed(os.time() * 1000 + (seed or 0))
  form_headers = {
    ["Content-Type"] = "application/x-www-form-urlencoded",
    ["Cookie"] = "session=" .. (cookie or ""),
  }
end

function request()
  if route == "post" then
    return wrk.format("GET", "/posts/" .. math.random(1, maxid))
  elseif route == "index" then
    return wrk.format("GET", "/?page=" .. math.random(1, pages))
  elseif route == "create" then
    return wrk.format("POST", "/posts/new", form_headers, "title=Bench+post&body=Written+by+wrk")
  end
  return wrk.format("GET", "/healthz")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "errors": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
