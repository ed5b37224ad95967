-- fdngx.prober.news: what the error log says when a probe changes a peer's place in the picks. Each line must
-- say what happens next: a peer the sidecar holds down came back "in picks" for 10 s only, and its down then
-- won again without a word (an outside review).
local prober = require("fdngx.prober")
local store = require("fdngx.store")

return {
    ["a probe's news says what happens next, and nothing when the picks do not change"] = function(t)
        t.eq(prober.news("dp1", "out", "up", 1), "fdngx: dp1 answers /health 200 again: back in picks")
        local said = prober.news("dp1", "down", "probe-up", 3)
        t.ok(said:find("^fdngx: dp1 answers /health 200 again: back in picks for up to 10 s, though the last push "
                       .. "says it is down: unless a push says up by then, or pushes stop, that down holds it out again$"), said)
        said = prober.news("dp1", "down", "own-up", 64.4)
        t.ok(said:find("back in picks (the push that says it is down is 64 s old: no push for over "
                       .. string.format("%.0f", store.SILENT_AFTER) .. " s, this frontend's own health checks "
                       .. "decide)", 1, true), said)
        t.eq(prober.news("dp1", "own-up", "out", 70), "fdngx: dp1 fails /health again: out of new picks while it does")
        for _, pair in ipairs({ { "down", "out" }, { "out", "down" }, { "out", "out" }, { "up", "up" },
                                { "own-up", "own-up" }, { "probe-up", "up" } }) do
            t.eq(prober.news("dp1", pair[1], pair[2], 1), nil, pair[1] .. " -> " .. pair[2])
        end
    end,
}
