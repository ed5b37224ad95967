-- fdngx.peers: the one validating parser for the peers file and the admin push.
local peers = require("fdngx.peers")

local GOOD = table.concat({
    "# fdngx peers for upstream fastdeploy",
    "generation 1733212345678",
    "peer dp0 127.0.0.1 8001 20 0 64 3.250",
    "peer dp1 ::1 8002 10 1 32 0",
    "peer node-b.dp2@x:y 10.0.0.3 8003 1 0 1 1000000",
    "",
}, "\n")

local function body(line)
    return "generation 1\n" .. line .. "\n"
end

return {
    ["a valid snapshot parses, in order, with bracketed IPv6 addresses"] = function(t)
        local snap = assert(peers.parse(GOOD))
        t.eq(snap.generation, 1733212345678)
        t.eq(#snap.peers, 3)
        local p = snap.peers[1]
        t.eq(p.name, "dp0"); t.eq(p.host, "127.0.0.1"); t.eq(p.addr, "127.0.0.1"); t.eq(p.port, 8001)
        t.eq(p.weight, 20); t.eq(p.down, false); t.eq(p.capacity, 64); t.eq(p.load, 3.25)
        t.eq(snap.by_name.dp1.addr, "[::1]"); t.eq(snap.by_name.dp1.down, true)
        t.eq(snap.peers[3].name, "node-b.dp2@x:y")
    end,

    ["hosts: IP literals only, no scope id, no leading zeros"] = function(t)
        for _, host in ipairs({ "127.0.0.1", "::1", "fe80::1", "1::",
                                "2001:db8::8:800:200c:417a", "::ffff:10.0.0.1", "1:2:3:4:5:6:7:8",
                                "1:2:3:4:5:6:1.2.3.4", "ABCD::ef", "1.0.0.0", "223.255.255.255", "240.0.0.1",
                                "255.255.255.254", "ff::1", "fe00::1" }) do
            t.ok(peers.valid_host(host), host .. " should be valid")
        end
        for _, host in ipairs({ "", "localhost", "256.0.0.1", "010.0.0.1", "1.2.3", "1.2.3.4.5", ":::", "1::2::3",
                                "fe80::1%eth0", "1:2:3:4:5:6:7:8:9", "12345::", "::1 ", " ::1", "1.2.3.4::",
                                "::1\"..os.execute('id')..\"", "g::1", "1:2:3:4:5:6:7:1.2.3.4", "[::1]",
                                "999", "0x7f000001" }) do
            t.ok(not peers.valid_host(host), host .. " should be refused")
        end
    end,

    ["hosts: no address that is no server's (as fdngx's inventory refuses them), however it is spelled"] = function(t)
        -- an outside review: 0.0.0.0 and 255.255.255.255 were taken as peers (0.0.0.0 connects to this host)
        local cases = {
            ["0.0.0.0"] = "unspecified", ["0.1.2.3"] = "unspecified", ["::"] = "unspecified",
            ["0:0:0:0:0:0:0:0"] = "unspecified", ["::ffff:0.0.0.0"] = "unspecified",
            ["224.0.0.1"] = "multicast", ["239.255.255.255"] = "multicast", ["ff02::1"] = "multicast",
            ["FF05::1:3"] = "multicast", ["::ffff:224.0.0.251"] = "multicast",
            ["255.255.255.255"] = "broadcast", ["::ffff:255.255.255.255"] = "broadcast",
        }
        for host, kind in pairs(cases) do
            t.ok(not peers.valid_host(host), host .. " should be refused")
            t.fails(function() return peers.parse(body("peer dp0 " .. host .. " 80 1 0 1 0")) end,
                    "line 2: bad host " .. string.format("%q", host) .. " (", host)
            local _, err = peers.parse(body("peer dp0 " .. host .. " 80 1 0 1 0"))
            t.ok(err:find(kind, 1, true) and err:find("no server's", 1, true), err)
        end
    end,

    ["generations: 0 to 2^53 - 1 exactly; a longer number is refused, never read as another"] = function(t)
        t.eq(assert(peers.parse(body("peer a 127.0.0.1 80 1 0 1 0"))).generation, 1)
        local top = assert(peers.parse("generation 9007199254740991\npeer a 127.0.0.1 80 1 0 1 0\n"))
        t.eq(top.generation, 2 ^ 53 - 1)
        t.eq(string.format("%d", top.generation), "9007199254740991")
        -- 2^53 + 1 reads as 2^53 in a double: it was accepted and answered as that other number
        for _, g in ipairs({ "9007199254740992", "9007199254740993", "9999999999999999", "10000000000000000" }) do
            t.fails(function() return peers.parse("generation " .. g .. "\npeer a 127.0.0.1 80 1 0 1 0\n") end,
                    "line 1: bad generation \"" .. g .. "\" (0..2^53-1)", g)
        end
    end,

    ["upstream: the name the snapshot is for, as data, once, before the peers; optional"] = function(t)
        local snap = assert(peers.parse("generation 5\nupstream fleet_2\npeer a 127.0.0.1 80 1 0 1 0\n"))
        t.eq(snap.upstream, "fleet_2"); t.eq(#snap.peers, 1)
        t.eq(assert(peers.parse("upstream _x\ngeneration 5\nempty\n")).upstream, "_x")
        t.eq(assert(peers.parse(body("peer a 127.0.0.1 80 1 0 1 0"))).upstream, nil, "an older fdngx's: none")
        t.eq(assert(peers.parse("# fdngx peers for upstream b\ngeneration 1\nempty\n")).upstream, nil,
             "a comment says nothing")
        local long = string.rep("u", 64)
        t.eq(assert(peers.parse("generation 1\nupstream " .. long .. "\nempty\n")).upstream, long)
        for line, why in pairs({
            ["upstream fleet\nupstream fleet"] = "line 3: a second upstream line",
            ["peer a 127.0.0.1 80 1 0 1 0\nupstream fleet"] = "line 3: upstream after the peers",
            ["empty\nupstream fleet"] = "line 3: upstream after the peers",
            ["upstream 1fleet"] = "line 2: bad upstream",
            ["upstream fle-et"] = "line 2: bad upstream",
            ["upstream " .. long .. "u"] = "line 2: bad upstream",
            ["upstream "] = "line 2: bad upstream",
            ["upstream  fleet"] = "line 2: bad upstream",
            ["upstream fleet "] = "line 2: bad upstream",
            ["upstream\tfleet"] = "line 2: unknown line",
            ["upstreams fleet"] = "line 2: unknown line",
        }) do
            t.fails(function() return peers.parse(body(line .. "\npeer b 127.0.0.1 81 1 0 1 0")) end, why, line)
        end
    end,

    ["frontends: how many frontends take the snapshot, once, before the peers; 1 when not said"] = function(t)
        t.eq(assert(peers.parse("generation 5\nupstream u\nfrontends 4\npeer a 127.0.0.1 80 1 0 1 0\n")).frontends, 4)
        t.eq(assert(peers.parse("frontends 1024\ngeneration 5\nempty\n")).frontends, 1024)
        t.eq(assert(peers.parse(body("peer a 127.0.0.1 80 1 0 1 0"))).frontends, 1, "an older fdngx's: one")
        for line, why in pairs({
            ["frontends 2\nfrontends 2"] = "line 3: a second frontends line",
            ["peer a 127.0.0.1 80 1 0 1 0\nfrontends 2"] = "line 3: frontends after the peers",
            ["empty\nfrontends 2"] = "line 3: frontends after the peers",
            ["frontends 0"] = "line 2: bad frontends \"0\" (1..1024)",
            ["frontends 1025"] = "line 2: bad frontends \"1025\" (1..1024)",
            ["frontends 02"] = "line 2: bad frontends",
            ["frontends -1"] = "line 2: bad frontends",
            ["frontends 2.0"] = "line 2: bad frontends",
            ["frontends 1e3"] = "line 2: bad frontends",
            ["frontends "] = "line 2: bad frontends",
            ["frontends  2"] = "line 2: bad frontends",
            ["frontends 2 "] = "line 2: bad frontends",
            ["frontends\t2"] = "line 2: unknown line",
            ["frontend 2"] = "line 2: unknown line",
        }) do
            t.fails(function() return peers.parse(body(line .. "\npeer b 127.0.0.1 81 1 0 1 0")) end, why, line)
        end
    end,

    ["hostile and malformed lines are refused with their line number"] = function(t)
        local cases = {
            { "peer a\"..os.execute('id')..\" 127.0.0.1 1 1 0 1 0", "bad name" },
            { "peer dp0 ::1%\"..(os.execute(\"id\"))..\" 1 1 0 1 0", "bad host" },
            { "peer dp0 fe80::1%eth0 1 1 0 1 0", "bad host" },
            { "peer dp0 127.0.0.1 0 1 0 1 0", "bad port" },
            { "peer dp0 127.0.0.1 65536 1 0 1 0", "bad port" },
            { "peer dp0 127.0.0.1 080 1 0 1 0", "bad port" },
            { "peer dp0 127.0.0.1 80 0 0 1 0", "bad weight" },
            { "peer dp0 127.0.0.1 80 10001 0 1 0", "bad weight" },
            { "peer dp0 127.0.0.1 80 1e26 0 1 0", "bad weight" },
            { "peer dp0 127.0.0.1 80 -1 0 1 0", "bad weight" },
            { "peer dp0 127.0.0.1 80 1 2 1 0", "bad down" },
            { "peer dp0 127.0.0.1 80 1 true 1 0", "bad down" },
            { "peer dp0 127.0.0.1 80 1 0 0 0", "bad capacity" },
            { "peer dp0 127.0.0.1 80 1 0 1000001 0", "bad capacity" },
            { "peer dp0 127.0.0.1 80 1 0 1 1e308", "bad load" },
            { "peer dp0 127.0.0.1 80 1 0 1 nan", "bad load" },
            { "peer dp0 127.0.0.1 80 1 0 1 inf", "bad load" },
            { "peer dp0 127.0.0.1 80 1 0 1 -1", "bad load" },
            { "peer dp0 127.0.0.1 80 1 0 1 .5", "bad load" },
            { "peer dp0 127.0.0.1 80 1 0 1 1.2345", "bad load" },
            { "peer dp0 127.0.0.1 80 1 0 1 1000000.001", "bad load" },
            { "peer dp0 127.0.0.1 80 1 0 1 0x10", "bad load" },
            { "peer dp0 127.0.0.1 80 1 0 1", "want 'peer NAME" },
            { "peer dp0 127.0.0.1 80 1 0 1 0 extra", "want 'peer NAME" },
            { "peer dp0  127.0.0.1 80 1 0 1 0", "want 'peer NAME" },
            { "peer dp0 127.0.0.1 80 1 0 1 0 ", "want 'peer NAME" },
            { "peer\tdp0 127.0.0.1 80 1 0 1 0", "unknown line" },
            { "os.execute('id')", "unknown line" },
            { "return 1", "unknown line" },
            { "Peer dp0 127.0.0.1 80 1 0 1 0", "unknown line" },
        }
        for _, case in ipairs(cases) do
            t.fails(function() return peers.parse(body(case[1])) end, "line 2: " .. case[2], case[1])
        end
    end,

    ["structure: generation first and once, peers unique, no peer only when it says empty"] = function(t)
        t.fails(function() return peers.parse("peer dp0 127.0.0.1 80 1 0 1 0\ngeneration 1\n") end,
                "line 1: a peer before the generation line")
        t.fails(function() return peers.parse("generation 1\ngeneration 2\n") end, "line 2: a second generation")
        t.fails(function() return peers.parse("generation -1\n") end, "bad generation")
        t.fails(function() return peers.parse("generation 12345678901234567\n") end, "bad generation")
        t.fails(function() return peers.parse("generation 1\n") end, "no peers")
        local empty = assert(peers.parse("# none registered yet\ngeneration 7\nempty\n"))
        t.eq(empty.generation, 7); t.eq(#empty.peers, 0); t.eq(next(empty.by_name), nil)
        t.fails(function() return peers.parse("empty\ngeneration 1\n") end, "line 1: empty before the generation")
        t.fails(function() return peers.parse("generation 1\nempty\nempty\n") end, "line 3: a second empty")
        t.fails(function() return peers.parse(body("empty\npeer a 127.0.0.1 80 1 0 1 0")) end, "says empty")
        t.fails(function() return peers.parse("generation 1\nempty now\n") end, "line 2: unknown line")
        t.fails(function() return peers.parse("") end, "no generation line")
        t.fails(function() return peers.parse(nil) end, "no snapshot")
        t.fails(function()
            return peers.parse(body("peer a 127.0.0.1 80 1 0 1 0\npeer a 127.0.0.2 80 1 0 1 0"))
        end, "line 3: duplicate peer")
        t.fails(function()
            return peers.parse(body("peer a ::1 80 1 0 1 0\npeer b ::1 80 1 0 1 0"))
        end, "line 3: duplicate address")
        -- one address however it is written (fdngx.inventory.address_key's rule)
        for _, pair in ipairs({ { "::1", "0:0:0:0:0:0:0:1" }, { "::ffff:127.0.0.1", "127.0.0.1" },
                                { "2001:DB8::1", "2001:0db8:0:0::0001" }, { "::ffff:7f00:1", "127.0.0.1" },
                                { "1::", "1:0:0:0:0:0:0.0.0.0" } }) do
            t.fails(function()
                return peers.parse(body("peer a " .. pair[1] .. " 80 1 0 1 0\npeer b " .. pair[2] .. " 80 1 0 1 0"))
            end, "line 3: duplicate address", pair[1] .. " = " .. pair[2])
        end
        t.ok(peers.parse(body("peer a ::1 80 1 0 1 0\npeer b ::1 81 1 0 1 0\npeer c ::2 80 1 0 1 0")))
        t.eq(peers.address("::ffff:10.0.0.1"), "10.0.0.1")
        t.eq(peers.address("2001:DB8::8:800:200C:417A"), "2001:db8:0:0:8:800:200c:417a")
    end,

    ["bytes that could smuggle a second line or cut one short are refused"] = function(t)
        t.fails(function() return peers.parse(body("peer dp0 127.0.0.1 80 1 0 1 0\r")) end, "carriage return")
        t.fails(function() return peers.parse(body("peer dp0 127.0.0.1 80 1 0 1 0\0")) end, "NUL")
        t.fails(function() return peers.parse(body("peer " .. string.rep("a", 500) .. " 127.0.0.1 80 1 0 1 0")) end,
                "longer than")
        t.fails(function() return peers.parse(body("peer " .. string.rep("a", 129) .. " 127.0.0.1 80 1 0 1 0")) end,
                "bad name")
    end,

    ["size caps: peers and bytes"] = function(t)
        local lines = { "generation 1" }
        for i = 1, peers.MAX_PEERS + 1 do
            lines[#lines + 1] = string.format("peer p%d 10.%d.%d.%d 80 1 0 1 0", i, math.floor(i / 65536) % 256,
                                              math.floor(i / 256) % 256, i % 256)
        end
        t.fails(function() return peers.parse(table.concat(lines, "\n")) end, "more than 10000 peers")
        t.fails(function() return peers.parse(string.rep("#", peers.MAX_BYTES + 1)) end, "larger than")
    end,

    ["error messages quote hostile fields harmlessly and briefly"] = function(t)
        local _, err = peers.parse(body("peer " .. string.rep("\1", 60) .. " 127.0.0.1 80 1 0 1 0"))
        t.ok(err and not err:find("\1", 1, true), err)
        t.ok(#err < 120, err)
    end,

    ["missing(): what a push added or removed"] = function(t)
        local a = assert(peers.parse(body("peer a 127.0.0.1 80 1 0 1 0\npeer b 127.0.0.1 81 1 0 1 0")))
        local b = assert(peers.parse(body("peer b 127.0.0.1 81 1 0 1 0\npeer c 127.0.0.1 82 1 0 1 0")))
        t.eq(table.concat(peers.missing(a, b), ","), "a")
        t.eq(table.concat(peers.missing(b, a), ","), "c")
        t.eq(#peers.missing(nil, a), 0)
        t.eq(table.concat(peers.missing(a, nil), ","), "a,b")
    end,
}
