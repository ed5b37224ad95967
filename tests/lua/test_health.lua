-- fdngx.health: back-off, probes, and who wins when the balancer and the sidecar disagree.
local health = require("fdngx.health")

return {
    ["only the last attempt's status is the current peer's ($upstream_status)"] = function(t)
        t.eq(health.last_status("200"), 200)
        t.eq(health.last_status("502, 200"), 200)
        t.eq(health.last_status("502, -"), nil, "the retry got no status: the 502 was the previous peer's")
        t.eq(health.last_status("429, -"), nil)
        t.eq(health.last_status("503, 504 : 200"), 200, "an internal redirect's part")
        t.eq(health.last_status("-"), nil)
        t.eq(health.last_status(""), nil)
        t.eq(health.last_status(nil), nil)
    end,
    ["a failure takes the peer out at once; the back-off doubles from 0.5 s up to 8 s"] = function(t)
        local h = health.new()
        t.ok(health.usable(h, false, 0, 100))
        h = health.on_failure(h, 100)
        t.ok(not health.usable(h, false, 0, 100), "out at once")
        t.ok(not health.usable(h, false, 0, 100.49))
        t.ok(health.usable(h, false, 0, 100.5), "back after 0.5 s without other evidence")
        local outs = {}
        for i = 1, 7 do
            local at = 200 + i * 100
            h = health.on_failure(h, at)
            outs[i] = h.till - at
        end
        t.eq(table.concat(outs, ","), "1,2,4,8,8,8,8")
    end,

    ["a success resets the back-off; a failed probe keeps the peer out"] = function(t)
        local h = health.on_failure(health.on_failure(health.new(), 10), 10.6) -- after its 0.5 s back-off
        t.eq(h.level, 2)
        local held = health.on_probe(h, false, 11.0)
        t.ok(health.balancer_out(held, 11.4), "a failed probe holds it out")
        h = health.on_success(h, 12)
        t.eq(h.level, 0)
        t.ok(health.usable(h, false, 0, 12))
        local same = health.new()
        t.ok(health.on_success(same, 1) == same, "nothing to write when nothing changes")
    end,

    ["a probe's first 200 brings a failed peer back at once"] = function(t)
        local h = health.on_failure(health.new(), 50) -- out until 50.5
        for i = 1, 20 do h = health.on_probe(h, false, 50 + i * 0.25) end -- down for 5 s: still out
        t.ok(not health.usable(h, false, 0, 55.1))
        h = health.on_probe(h, true, 55.2)
        local ok, state = health.usable(h, false, 0, 55.2)
        t.ok(ok); t.eq(state, "up")
    end,

    ["a flapping peer (probe 200, requests fail) waits out its back-off"] = function(t)
        local h = health.new()
        -- requests fail, its /health says 200 and brings it back each time, FLAP_LEVEL times in a row
        for i = 1, health.FLAP_LEVEL do
            h = health.on_failure(h, i * 0.01 - 0.005)
            h = health.on_probe(h, true, i * 0.01)
            t.ok(not h.out, "back on a 200 after " .. i .. " failure(s) in a row")
        end
        h = health.on_failure(h, 0.05)
        t.eq(h.level, health.FLAP_LEVEL + 1)
        local till = h.till
        h = health.on_probe(h, true, 0.1)
        t.ok(not health.usable(h, false, 0, 0.1), "probe 200 alone does not bring it back")
        t.ok(health.usable(h, false, 0, till), "its back-off's end does")
        h = health.on_probe(h, true, till + 0.1)
        t.ok(not h.out, "and a 200 after that clears the flag")
    end,

    ["failures at once are one episode: a healthy replica is not taken for flapping"] = function(t)
        local h = health.new()
        -- killed with ten non-streaming requests open, or ten connects refused in a spike: ten failures at once
        for i = 1, 10 do h = health.on_failure(h, 100 + i * 0.001) end
        t.eq(h.level, 1)
        t.near(h.till, 100.501, 1e-9, "out for the first back-off, 0.5 s")
        local same = health.on_failure(h, 100.2)
        t.ok(same == h, "a failure while out changes nothing (no write, no ver)")
        h = health.on_probe(h, true, 100.25) -- its /health answers: back at once
        t.ok(not h.out)
    end,

    ["a peer whose probes fail is down, not flapping: its first 200 brings it back, however it failed"] = function(t)
        for _, sidecar_down in ipairs({ false, true }) do
            -- flapping at its top level, then killed: its probes fail
            local h = { out = true, level = health.MAX_LEVEL, till = 108, changed = 100, ok_at = 99 }
            for i = 1, 8 do h = health.on_probe(h, false, 100 + i * 0.25, sidecar_down) end -- refused: dead
            t.ok(h.level <= health.FLAP_LEVEL, "level " .. h.level)
            h = health.on_probe(h, true, 102.25, sidecar_down) -- restarted: its first 200
            t.ok(not h.out, "back on its first 200 (sidecar down: " .. tostring(sidecar_down) .. ")")
        end
    end,

    ["a dead peer the sidecar holds down: its record changes once per HOLD_DOWN, and it stays out"] = function(t)
        local function changes(sidecar_down)
            local h, n = health.on_failure(health.new(), 100), 0
            for i = 1, 160 do -- 40 s of refused probes, 4 a second
                local now = 100 + i * 0.25
                local nh = health.on_probe(h, false, now, sidecar_down)
                if health.differs(h, nh) then n = n + 1 end
                h = nh
                t.ok(health.balancer_out(h, now), "out at " .. now) -- never a fail-open guess
            end
            return n
        end
        local up, down = changes(false), changes(true)
        t.ok(up >= 20, "the sidecar's up: re-held every 1.5 s (" .. up .. ")")
        t.ok(down <= 5, "the sidecar's down: every 9.5 s (" .. down .. ")")
        -- its first 200 still brings it back at once (not flapping)
        local h = health.on_failure(health.new(), 100)
        h = health.on_probe(h, false, 100.25, true)
        h = health.on_probe(h, true, 100.5, true)
        t.ok(not h.out, "back on the first 200")
    end,

    ["the balancer's failure evidence wins over the sidecar's up"] = function(t)
        local h = health.on_failure(health.new(), 100)
        for i = 1, 80 do h = health.on_probe(h, false, 100 + i * 0.25) end -- 20 s of refused probes
        local ok, state = health.usable(h, false, 0, 120)
        t.ok(not ok); t.eq(state, "out")
    end,

    ["the sidecar's down wins, unless the balancer saw the peer come back, for 10 s at most"] = function(t)
        local h = health.new()
        -- sidecar says down at t=10; the balancer has no evidence of its own: down
        local ok, state = health.usable(h, true, 10, 10.1)
        t.ok(not ok); t.eq(state, "down")
        t.ok(health.needs_probe(h, true, 10.1), "the balancer probes what the sidecar holds down")
        -- a probe 200 with no outage seen: still the sidecar's call
        h = health.on_probe(h, true, 10.2)
        t.ok(not health.usable(h, true, 10, 10.3))
        -- the balancer sees it fail and come back (a restart): it wins for DISAGREE_FOR
        h = health.on_probe(h, false, 10.5)
        t.ok(not health.usable(h, true, 10, 10.6))
        h = health.on_probe(h, true, 12.0)
        ok, state = health.usable(h, true, 10, 12.0)
        t.ok(ok); t.eq(state, "probe-up")
        t.ok(health.usable(h, true, 10, 12 + health.DISAGREE_FOR - 0.01))
        ok, state = health.usable(h, true, 10, 12 + health.DISAGREE_FOR)
        t.ok(not ok, "the sidecar still says down after 10 s: it wins"); t.eq(state, "down")
        -- a recovery seen before the sidecar's verdict does not override it
        t.ok(not health.usable(h, true, 13, 13.1))
    end,

    ["records survive the shared dict (encode/decode)"] = function(t)
        local h = health.on_probe(health.on_failure(health.new(), 1733212345.678), true, 1733212346.5)
        local back = health.decode(health.encode(h))
        t.eq(back.out, h.out); t.eq(back.level, h.level); t.eq(back.changed, h.changed)
        t.near(back.ok_at, h.ok_at, 0.001); t.near(back.till, h.till, 0.001)
        t.eq(health.decode(nil).level, 0)
        t.eq(health.decode("garbage").out, false)
    end,

    ["a failed probe holds the peer out in steps: at least HOLD more, renewed only when less is left"] = function(t)
        local h = health.on_failure(health.new(), 100) -- out until 100.5
        local n = health.on_probe(h, false, 100.1)
        t.near(n.till, 100.1 + health.HOLD_FOR, 1e-9, "less than HOLD left: held for HOLD_FOR")
        local again = health.on_probe(n, false, 100.35)
        t.ok(not health.differs(again, n), "more than HOLD left: nothing changes")
        t.ok(health.balancer_out(again, 100.1 + health.HOLD_FOR - 0.01))
        again = health.on_probe(n, false, 100.1 + health.HOLD_FOR - health.HOLD + 0.01)
        t.ok(health.differs(again, n), "renewed once less than HOLD is left")
        t.ok(health.balancer_out(again, 100.1 + health.HOLD_FOR + health.HOLD))
        -- a 200 while held: back at once (not flapping), and only ok_at changes for a peer already in
        local back = health.on_probe(n, true, 100.6)
        t.ok(health.differs(back, n) and health.usable(back, false, 0, 100.6))
        local still = health.on_probe(back, true, 100.85)
        t.ok(not health.differs(still, back)); t.eq(still.ok_at, 100.85)
    end,

    ["a silent sidecar's down holds a peer out no more: the balancer's own probes decide"] = function(t)
        -- An outside review: a dead controller's down held a replica out of every frontend for good, though its
        -- /health answered 200 again ("back in picks" for 10 s, then the old down won again, silently).
        local h = health.new()
        local ok, state = health.usable(h, true, 10, 30, true)
        t.ok(not ok, "no evidence of its own yet: the down holds"); t.eq(state, "down")
        t.ok(health.needs_probe(h, true, 30), "and it is probed")
        local up = health.on_probe(h, true, 30.1) -- the first 200 of a record is news (written: fdngx.pool.mark)
        t.ok(health.differs(h, up))
        ok, state = health.usable(up, true, 10, 30.1, true)
        t.ok(ok); t.eq(state, "own-up")
        ok, state = health.usable(up, true, 10, 30.1 + 3600, true)
        t.ok(ok, "for as long as no push comes and no failure is seen"); t.eq(state, "own-up")
        t.ok(not health.usable(up, true, 10, 30.1), "heard from (not silent), the sidecar's down wins as before")
        -- its /health fails: out, held by its probes; a lapsed hold is no evidence of health
        local down = health.on_probe(up, false, 40)
        ok, state = health.usable(down, true, 10, 40.1, true)
        t.ok(not ok); t.eq(state, "out")
        t.ok(not health.usable(down, true, 10, 50, true), "out since its last failure, until a 200")
        ok, state = health.usable(health.on_probe(down, true, 50), true, 10, 50, true)
        t.ok(ok); t.eq(state, "own-up")
        -- a peer the sidecar says up is unaffected
        t.ok(health.usable(health.new(), false, 0, 30, true))
    end,
}
