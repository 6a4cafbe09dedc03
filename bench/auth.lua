-- wrk script: POST a fixed JSON body, each request with the next Authorization header value
-- read from a file, one value per line (e.g. "STT1 v3.local...." or "Bearer eyJ...").
--
--   wrk -t1 -c32 -d10s --latency -s bench/auth.lua http://127.0.0.1:PORT/rest/add/ -- FILE [THREADS [BODY]]
--
-- FILE: the header values; THREADS: the same number as wrk's -t (default 1; wrk does not tell
-- a script how many threads it runs); BODY: the JSON body (default {"a": 1, "b": 2}).
--
-- Why a file and request(): STT1 tokens are single-use, so every request must carry a
-- different, pre-minted token. The same script serves every stack so that the load generator
-- does the same work whatever it measures:
--   * an empty file      -> no Authorization header (the stacks without auth);
--   * a one-line file    -> that value on every request (a JWT is reusable: that is how it works);
--   * an N-line file     -> line i on request i, never reused. With several wrk threads, thread t
--                           of T takes lines t, t+T, t+2T, ... so no two threads share a token
--                           (pass T as the THREADS argument).
-- If the lines run out, the thread stops at once and the one request it still has to send goes
-- without the header (so it fails visibly, as an error): a token is never sent twice. done()
-- prints the counts; bench/run.py treats `exhausted` > 0 as a failed run.
-- Note: wrk calls request() once before the run to check the script, so the first line is
-- drawn but never sent (harmless: an unused token is not a reused one).

local threads = {}
local counter = 0

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   local file = args[1]
   local total_threads = tonumber(args[2] or "1")
   local body = args[3] or '{"a": 1, "b": 2}'
   assert(file, "usage: wrk ... -s auth.lua URL -- FILE [THREADS [BODY]]")

   values = {}
   local i = 0
   for line in io.lines(file) do
      if line ~= "" then
         if i % total_threads == id then
            values[#values + 1] = line
         end
         i = i + 1
      end
   end
   -- Build the request once with a placeholder header, so wrk.format supplies Host and
   -- Content-Length exactly as it would for a plain request, then split it around the value.
   local marker = "@@AUTHORIZATION-VALUE@@"
   local headers = { ["Content-Type"] = "application/json" }
   if #values > 0 then
      headers["Authorization"] = marker
   end
   local raw = wrk.format("POST", wrk.path, headers, body)
   local at = raw:find(marker, 1, true)
   if at then
      prefix, suffix = raw:sub(1, at - 1), raw:sub(at + #marker)
   else
      fixed = raw
   end
   if #values == 1 then
      fixed = prefix .. values[1] .. suffix
   end
   bare = wrk.format("POST", wrk.path, { ["Content-Type"] = "application/json" }, body)
   nvalues, next_index, used, exhausted = #values, 1, 0, 0
end

function request()
   used = used + 1
   if fixed then
      return fixed
   end
   local value = values[next_index]
   if value == nil then
      exhausted = exhausted + 1
      wrk.thread:stop()
      return bare
   end
   next_index = next_index + 1
   return prefix .. value .. suffix
end

function done(summary, latency, requests)
   local tokens, total_used, total_exhausted = 0, 0, 0
   for _, thread in ipairs(threads) do
      tokens = tokens + thread:get("nvalues")
      total_used = total_used + thread:get("used")
      total_exhausted = total_exhausted + thread:get("exhausted")
   end
   io.write(string.format("auth.lua: values=%d used=%d exhausted=%d\n", tokens, total_used, total_exhausted))
end
