-- A tiny test runner for the balancer's pure modules, with plain luajit (no busted needed):
--     luajit tests/lua/run.lua templates/lua tests/lua/test_*.lua
-- Each test file returns { ["name"] = function(t) ... end }; t offers eq/ok/near/fails. Exit 1 on failure.

local lua_dir = assert(arg[1], "usage: run.lua LUA_DIR TEST_FILE...")
package.path = lua_dir .. "/?.lua;" .. arg[0]:gsub("run%.lua$", "") .. "?.lua;" .. package.path

local function show(v)
    if type(v) == "string" then return string.format("%q", v) end
    return tostring(v)
end

local T = {}
function T.ok(cond, msg)
    if not cond then error(msg or "expected a true value", 2) end
end
function T.eq(got, want, msg)
    if got ~= want then error((msg and msg .. ": " or "") .. "got " .. show(got) .. ", want " .. show(want), 2) end
end
function T.near(got, want, tol, msg)
    if type(got) ~= "number" or math.abs(got - want) > tol then
        error((msg and msg .. ": " or "") .. "got " .. show(got) .. ", want " .. want .. " +- " .. tol, 2)
    end
end
-- fn() must return nil plus an error containing `pattern` (plain text).
function T.fails(fn, pattern, msg)
    local v, err = fn()
    if v ~= nil then error((msg or "") .. " expected a refusal, got a value", 2) end
    if not (err and err:find(pattern, 1, true)) then
        error((msg or "") .. " error " .. show(err) .. " does not mention " .. show(pattern), 2)
    end
end

local passed, failed = 0, 0
for i = 2, #arg do
    local file = arg[i]
    local tests = dofile(file)
    local names = {}
    for name in pairs(tests) do names[#names + 1] = name end
    table.sort(names)
    for _, name in ipairs(names) do
        local ok, err = xpcall(function() tests[name](T) end, debug.traceback)
        if ok then
            passed = passed + 1
        else
            failed = failed + 1
            io.stderr:write("FAIL ", file, " :: ", name, "\n", tostring(err), "\n\n")
        end
    end
end
print(string.format("%d passed, %d failed", passed, failed))
os.exit(failed == 0 and 0 or 1)
