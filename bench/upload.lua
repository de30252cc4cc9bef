-- wrk script: POST real digit PNGs to /prediction/, rotating through the files.
--
--   BENCH_FILES=manifest.txt BENCH_MODE=multipart|raw BENCH_OUT=summary.json \
--     wrk -t1 -c64 -d12s --timeout 30s -s bench/upload.lua http://127.0.0.1:PORT
--
-- BENCH_FILES names a file with one PNG path per line. Every request is built once, in init(),
-- so the load generator does no per-request work beyond picking the next one. response() counts
-- statuses and keeps the prediction_id of every 201 (the service answers only after COMMIT, so
-- each of them must be in the event table afterwards); done() writes one JSON summary to
-- BENCH_OUT: counts, socket errors and latency percentiles (microseconds). BENCH_OK_STATUS (default
-- 201) is the status counted as a success: the BentoML peer stores nothing and answers 200.

local threads = {}
local next_id = 1

function setup(thread)
   thread:set("id", next_id)
   threads[#threads + 1] = thread
   next_id = next_id + 1
end

local function read_file(path)
   local handle = assert(io.open(path, "rb"))
   local data = handle:read("*a")
   handle:close()
   return data
end

function init(args)
   local mode = os.getenv("BENCH_MODE") or "multipart"
   local manifest = assert(os.getenv("BENCH_FILES"), "BENCH_FILES is not set")
   local boundary = "----wrk-bench-7f3a9c2e"
   requests = {}
   for path in io.lines(manifest) do
      if path ~= "" then
         local name = path:match("([^/]+)$")
         local data = read_file(path)
         local request
         if mode == "raw" then
            request = wrk.format("POST", "/prediction/?filename=" .. name, { ["Content-Type"] = "image/png" }, data)
         else
            local body = "--" .. boundary .. "\r\n"
               .. 'Content-Disposition: form-data; name="file"; filename="' .. name .. '"\r\n'
               .. "Content-Type: image/png\r\n\r\n"
               .. data .. "\r\n--" .. boundary .. "--\r\n"
            request = wrk.format("POST", "/prediction/",
               { ["Content-Type"] = "multipart/form-data; boundary=" .. boundary }, body)
         end
         requests[#requests + 1] = request
      end
   end
   assert(#requests > 0, "no files in " .. manifest)
   -- Threads start at different files, so concurrent requests carry different images.
   index = ((id - 1) * 37) % #requests
   ok_status = tonumber(os.getenv("BENCH_OK_STATUS") or "201")
   created = 0
   other = 0
   statuses = {}
   ids = {}
end

function request()
   index = index % #requests + 1
   return requests[index]
end

function response(status, headers, body)
   if status == ok_status then
      created = created + 1
      local prediction_id = body:match('"prediction_id":"([0-9a-f%-]+)"')
      if prediction_id then
         ids[#ids + 1] = prediction_id
      end
   else
      other = other + 1
      local key = tostring(status)
      statuses[key] = (statuses[key] or 0) + 1
   end
end

local function json_string(value)
   return '"' .. tostring(value):gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
end

function done(summary, latency, requests)
   local out_path = os.getenv("BENCH_OUT")
   local total_created, total_other, by_status, all_ids = 0, 0, {}, {}
   for _, thread in ipairs(threads) do
      total_created = total_created + thread:get("created")
      total_other = total_other + thread:get("other")
      for status, count in pairs(thread:get("statuses")) do
         by_status[status] = (by_status[status] or 0) + count
      end
      for _, prediction_id in ipairs(thread:get("ids")) do
         all_ids[#all_ids + 1] = json_string(prediction_id)
      end
   end
   local statuses_json = {}
   for status, count in pairs(by_status) do
      statuses_json[#statuses_json + 1] = json_string(status) .. ":" .. count
   end
   local percentiles = {}
   for _, p in ipairs({ 50, 75, 90, 99, 99.9 }) do
      percentiles[#percentiles + 1] = json_string(p) .. ":" .. latency:percentile(p)
   end
   local e = summary.errors
   local text = "{"
      .. '"duration_us":' .. summary.duration
      .. ',"requests":' .. summary.requests
      .. ',"bytes":' .. summary.bytes
      .. ',"created":' .. total_created
      .. ',"non_201":' .. total_other
      .. ',"statuses":{' .. table.concat(statuses_json, ",") .. "}"
      .. ',"errors":{"connect":' .. e.connect .. ',"read":' .. e.read .. ',"write":' .. e.write
      .. ',"status":' .. e.status .. ',"timeout":' .. e.timeout .. "}"
      .. ',"latency_us":{"mean":' .. latency.mean .. ',"stdev":' .. latency.stdev
      .. ',"min":' .. latency.min .. ',"max":' .. latency.max
      .. ',"percentiles":{' .. table.concat(percentiles, ",") .. "}}"
      .. ',"prediction_ids":[' .. table.concat(all_ids, ",") .. "]"
      .. "}\n"
   if out_path then
      local handle = assert(io.open(out_path, "w"))
      handle:write(text)
      handle:close()
   else
      io.write(text)
   end
end
