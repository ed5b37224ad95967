-- fdngx.ledger: in-flight counters return to exact values even when a worker dies mid-request.
local ledger = require("fdngx.ledger")
local fakedict = require("fakedict")

return {
    ["acquire and release count per peer, over workers"] = function(t)
        local dict = fakedict.new()
        local a, b = ledger.new(dict, "100.1"), ledger.new(dict, "200.1")
        a:acquire("dp0"); a:acquire("dp0"); b:acquire("dp0"); b:acquire("dp1")
        t.eq(a:inflight("dp0"), 3); t.eq(b:inflight("dp1"), 1)
        a:release("dp0"); b:release("dp0"); b:release("dp1")
        t.eq(a:inflight("dp0"), 1); t.eq(a:inflight("dp1"), 0)
        t.eq(dict:get("o:200.1:dp0"), nil, "a share at 0 is deleted")
    end,

    ["a dead worker's requests are taken back; live and draining workers keep theirs"] = function(t)
        local dict = fakedict.new()
        local live, draining, dead = ledger.new(dict, "100.1"), ledger.new(dict, "200.1"), ledger.new(dict, "300.1")
        for _, w in ipairs({ live, draining, dead }) do w:renew(); w:acquire("dp0"); w:acquire("dp1") end
        dead:acquire("dp0")
        t.eq(live:inflight("dp0"), 4)
        local alive = { [100] = true, [200] = true } -- 300 crashed
        -- every lease still runs: nobody is reaped, even the crashed one
        t.eq((ledger.reap(dict, function(pid) return alive[pid] end)), 0)
        dict.clock = ledger.LEASE + 1 -- leases lapse; only 100 renews (200 drains after a reload: no timers)
        live:renew()
        local taken, workers = ledger.reap(dict, function(pid) return alive[pid] end)
        t.eq(taken, 3); t.eq(workers, 1)
        t.eq(live:inflight("dp0"), 2); t.eq(live:inflight("dp1"), 2)
        -- the draining worker's requests end normally later
        draining:release("dp0"); draining:release("dp1")
        t.eq(live:inflight("dp0"), 1); t.eq(live:inflight("dp1"), 1)
        live:release("dp0"); live:release("dp1")
        t.eq(live:inflight("dp0"), 0); t.eq(live:inflight("dp1"), 0)
    end,

    ["the reaper asks about a worker with its start, so a pid reused by a younger process counts as dead"] = function(t)
        local dict = fakedict.new()
        local dead = ledger.new(dict, ledger.worker_id(600, 1000.25)) -- up since 1000.25 s
        dead:acquire("dp0"); dead:acquire("dp0")
        dict.clock = 2000 -- its lease lapsed long ago; pid 600 lives, but it is another process now
        local asked = {}
        local function pid_alive(pid, since)
            asked[#asked + 1] = since
            return pid == 600 and since + ledger.REUSED_AFTER >= 1900 -- the process on pid 600 started at 1900
        end
        local taken = ledger.reap(dict, pid_alive)
        t.eq(taken, 2)
        t.eq(asked[1], 1000.25)
        t.eq(dead:inflight("dp0"), 0)
    end,

    ["started_at reads /proc/<pid>/stat's start time, whatever the command name holds"] = function(t)
        -- field 22 (starttime) is 12345 ticks; the command name has spaces and parentheses
        local fields = {}
        for i = 3, 21 do fields[#fields + 1] = tostring(i) end
        local stat = "4242 (nginx: worker) (x)) " .. table.concat(fields, " ") .. " 12345 99 100\n"
        t.near(ledger.started_at(stat, 1700000000, 100), 1700000123.45, 1e-6)
        t.eq(ledger.started_at("garbage", 1700000000, 100), nil)
        t.eq(ledger.started_at(nil, 1700000000, 100), nil)
        t.eq(ledger.started_at(stat, nil, 100), nil)
        t.eq(ledger.started_at("1 (init) S 0", 1700000000, 100), nil, "too few fields")
    end,

    ["started_at on this machine's /proc: the test process started a moment ago"] = function(t)
        local ffi = require("ffi")
        pcall(ffi.cdef, "long sysconf(int name);")
        local fs, fself = io.open("/proc/stat", "rb"), io.open("/proc/self/stat", "rb")
        if not (fs and fself) then return end -- no /proc: the reaper asks kill(pid, 0) alone there
        local btime = tonumber(fs:read(65536):match("\nbtime (%d+)")); fs:close()
        local stat = fself:read(4096); fself:close()
        local at = ledger.started_at(stat, btime, tonumber(ffi.C.sysconf(2)))
        t.ok(at and math.abs(at - os.time()) < 30, "started " .. tostring(at) .. ", now " .. os.time())
    end,

    ["a worker taken for dead does not decrement twice"] = function(t)
        local dict = fakedict.new()
        local w, other = ledger.new(dict, "400.1"), ledger.new(dict, "500.1")
        w:acquire("dp0"); other:acquire("dp0")
        dict.clock = 100
        ledger.reap(dict, function(pid) return pid == 500 end) -- 400 looked dead (no lease, pid gone)
        t.eq(other:inflight("dp0"), 1)
        w:release("dp0") -- its request ends after all: the reaped share is not subtracted again
        t.eq(other:inflight("dp0"), 1)
        other:release("dp0")
        t.eq(other:inflight("dp0"), 0)
    end,

    ["a total that is gone (swept, evicted) is not brought back negative by a release or a reap"] = function(t)
        local dict = fakedict.new()
        local w, dead = ledger.new(dict, "700.1"), ledger.new(dict, "800.1")
        w:acquire("dp0"); dead:acquire("dp1")
        dict:delete("i:dp0"); dict:delete("i:dp1")
        w:release("dp0")
        dict.clock = 100
        ledger.reap(dict, function(pid) return pid == 700 end)
        t.eq(dict:get("i:dp0"), nil); t.eq(dict:get("i:dp1"), nil)
        w:acquire("dp0")
        t.eq(w:inflight("dp0"), 1, "the next request counts from 0")
    end,

    ["counts never read below zero; worker ids are unique per start"] = function(t)
        local dict = fakedict.new()
        dict:set("i:dp0", -2)
        t.eq(ledger.new(dict, "1.1"):inflight("dp0"), 0)
        t.ok(ledger.worker_id(42, 1.5) ~= ledger.worker_id(42, 2.5))
        t.eq(ledger.worker_id(42, 1733212345.678), "42.1733212345678")
    end,

    ["peer names with colons and dots are parsed back from share keys"] = function(t)
        local dict = fakedict.new()
        local w = ledger.new(dict, "600.1")
        w:acquire("fd-10.0.0.1-8001"); w:acquire("node:a.dp0")
        dict.clock = 100
        t.eq((ledger.reap(dict, function() return false end)), 2)
        t.eq(w:inflight("fd-10.0.0.1-8001"), 0); t.eq(w:inflight("node:a.dp0"), 0)
    end,
}
