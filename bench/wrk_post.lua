-- POST unique signed callbacks: one "<signature> <body>" per line of $BENCH_BODIES.
local lines = {}
for line in io.lines(os.getenv("BENCH_BODIES")) do lines[#lines + 1] = line end
local index = 0
request = function()
  index = index + 1
  local line = lines[(index - 1) % #lines + 1]
  local space = line:find(" ", 1, true)
  return wrk.format("POST", "/webhooks/runflow", {
    ["Content-Type"] = "application/json",
    ["Runflow-Signature"] = line:sub(1, space - 1),
  }, line:sub(space + 1))
end
