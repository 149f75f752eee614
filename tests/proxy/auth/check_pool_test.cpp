// The password-check pool: jobs run off the caller's thread, results come back on the
// caller's executor, and a full queue answers at once (the caller turns that into 503
// overloaded) while the worker's other coroutines go on.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <future>
#include <thread>

#include "access_log.hpp"
#include "auth/authenticator.hpp"
#include "auth/check_pool.hpp"
#include "net/asio.hpp"

using namespace dmz::proxy;
namespace asio = dmz::net::asio;
using dmz::net::task;

namespace {

/// A gate the test opens: jobs parked on it keep the pool's threads busy.
struct gate {
    std::promise<void> p;
    std::shared_future<void> f = p.get_future().share();
};

TEST(CheckPool, ResultsComeBackOnTheCallersExecutorFromAnotherThread) {
    check_pool pool(2, 4);
    asio::io_context io(1);
    std::thread::id ran_on, resumed_on;
    int got = 0;
    asio::co_spawn(io, [&]() -> task<> {
        auto ex = co_await asio::this_coro::executor;
        auto r = co_await pool.run<int>(ex, [&] {
            ran_on = std::this_thread::get_id();
            return 42;
        });
        resumed_on = std::this_thread::get_id();
        got = r.value_or(-1);
    }, asio::detached);
    io.run();  // returns only once the result came back: the wait counts as work
    EXPECT_EQ(got, 42);
    EXPECT_NE(ran_on, std::this_thread::get_id()) << "the job ran on the io_context's thread";
    EXPECT_EQ(resumed_on, std::this_thread::get_id()) << "the coroutine resumed off its executor";
}

TEST(CheckPool, AFullQueueAnswersAtOnceAndOtherCoroutinesGoOn) {
    check_pool pool(1, 1);
    gate g;
    std::atomic<bool> started{false};
    // One job holds the only thread, one waits in the only queue slot.
    ASSERT_TRUE(pool.try_submit([&] {
        started = true;
        g.f.wait();
    }));
    while (!started) std::this_thread::yield();
    ASSERT_TRUE(pool.try_submit([] {}));
    EXPECT_FALSE(pool.try_submit([] {}));

    asio::io_context io(1);
    bool refused = false, other_ran = false;
    asio::co_spawn(io, [&]() -> task<> {
        auto ex = co_await asio::this_coro::executor;
        auto r = co_await pool.run<int>(ex, [] { return 1; });
        refused = !r.has_value();
    }, asio::detached);
    asio::co_spawn(io, [&]() -> task<> {
        other_ran = true;
        co_return;
    }, asio::detached);
    auto t0 = std::chrono::steady_clock::now();
    io.run();
    EXPECT_TRUE(refused) << "a full queue must answer, not wait";
    EXPECT_TRUE(other_ran);
    EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
    g.p.set_value();
    pool.shutdown();
}

TEST(CheckPool, AJobThatWaitedTooLongIsAnsweredLikeAFullQueue) {
    check_pool pool(1, 4, std::chrono::milliseconds(0));
    gate g;
    std::atomic<bool> started{false}, ran{false};
    ASSERT_TRUE(pool.try_submit([&] {
        started = true;
        g.f.wait();
    }));
    while (!started) std::this_thread::yield();
    asio::io_context io(1);
    bool refused = false;
    asio::co_spawn(io, [&]() -> task<> {
        auto ex = co_await asio::this_coro::executor;
        auto r = co_await pool.run<int>(ex, [&] {
            ran = true;
            return 1;
        });
        refused = !r.has_value();
    }, asio::detached);
    io.poll();  // queues the job behind the busy thread
    auto queued = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() == queued) std::this_thread::yield();  // older than max_wait (0)
    g.p.set_value();
    io.run();
    EXPECT_TRUE(refused);
    EXPECT_FALSE(ran) << "a stale check is not done late";
}

TEST(CheckPool, AnExceptionInTheJobReachesTheCoroutine) {
    check_pool pool(1, 2);
    asio::io_context io(1);
    std::string what;
    asio::co_spawn(io, [&]() -> task<> {
        auto ex = co_await asio::this_coro::executor;
        try {
            co_await pool.run<int>(ex, []() -> int { throw std::runtime_error("scrypt failed"); });
        } catch (const std::runtime_error& e) {
            what = e.what();
        }
    }, asio::detached);
    io.run();
    EXPECT_EQ(what, "scrypt failed");
}

TEST(CheckPool, ShutdownDropsWhatWaits) {
    auto pool = std::make_unique<check_pool>(1, 4);
    gate g;
    std::atomic<int> ran{0};
    ASSERT_TRUE(pool->try_submit([&] {
        g.f.wait();
        ++ran;
    }));
    ASSERT_TRUE(pool->try_submit([&] { ++ran; }));
    std::thread opener([&] {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));  // not synchronisation: lets shutdown() start first
        g.p.set_value();
    });
    pool->shutdown();
    opener.join();
    EXPECT_LE(ran.load(), 1);
    EXPECT_FALSE(pool->try_submit([] {})) << "a stopped pool takes no work";
}

/// A user store holding alice (password "pw", group mail) in a temporary folder, and an
/// authenticator context on a pool of one thread with two places.
struct store_with_alice {
    std::string dir = make_dir();
    auth_context ctx{std::make_shared<user_directory>(save_store(dir)), std::make_shared<lockout_table>(),
                     std::make_shared<check_pool>(1, 2)};
    ~store_with_alice() {
        ctx.pool->shutdown();
        std::error_code ec;
        std::filesystem::remove_all(dir, ec);
    }
    static std::string make_dir() {
        std::string d = (std::filesystem::temp_directory_path() / "dmz-auth-test-XXXXXX").string();
        if (!mkdtemp(d.data())) throw std::runtime_error("mkdtemp failed");
        return d;
    }
    static std::string save_store(const std::string& d) {
        user_store s;
        s.set("alice", "pw", std::vector<std::string>{"mail"});
        s.save(d + "/users.toml");
        return d + "/users.toml";
    }
};

/// The authenticator on a saturated pool: overloaded, not a bad password; and a cached
/// password needs no pool at all.
TEST(Authenticator, SaturatedPoolIsOverloadedAndACachedPasswordSkipsThePool) {
    store_with_alice fx;
    auto& ctx = fx.ctx;
    authenticator a(ctx);
    asio::io_context io(1);
    authenticator::result first, busy, cached;
    gate g;
    std::atomic<bool> started{false};
    asio::co_spawn(io, [&]() -> task<> {
        std::string user = "alice", pw = "pw", listener = "web";
        auto address = *dmz::rules::ip_address::parse("127.0.0.1");
        dmz::rules::lockout_policy policy;
        first = co_await a.check(user, pw, listener, address, policy);
        // Fill the pool: one job running, the rest waiting.
        ctx.pool->try_submit([&] {
            started = true;
            g.f.wait();
        });
        while (!started) std::this_thread::yield();
        while (ctx.pool->try_submit([] {})) {
        }
        std::string wrong = "nope";
        busy = co_await a.check(user, wrong, listener, address, policy);
        cached = co_await a.check(user, pw, listener, address, policy);
        g.p.set_value();
    }, asio::detached);
    io.run();
    ctx.pool->shutdown();  // join the thread still returning from the gate before the gate goes
    EXPECT_TRUE(first.ok) << first.refusal;
    EXPECT_EQ(first.groups, std::vector<std::string>{"mail"});
    EXPECT_FALSE(busy.ok);
    EXPECT_TRUE(busy.overloaded);
    EXPECT_EQ(busy.refusal, "overloaded");
    EXPECT_TRUE(cached.ok) << "a cached password must not need the (full) pool";
    EXPECT_FALSE(cached.overloaded);
    auto f = auth_overloaded_fault("alice");
    EXPECT_EQ(f.status, 503);
    EXPECT_EQ(f.cls, dmz::rules::fault_class::overloaded);
}

/// An address past its failure threshold is refused at once, without the pool: a saturated
/// pool would otherwise say "overloaded". Other addresses still get their checks.
TEST(Authenticator, ALockedOutAddressCostsNoCheck) {
    store_with_alice fx;
    auto& ctx = fx.ctx;
    authenticator a(ctx);
    asio::io_context io(1);
    authenticator::result guesses[3], locked, busy_elsewhere;
    gate g;
    std::atomic<bool> started{false};
    asio::co_spawn(io, [&]() -> task<> {
        std::string listener = "web", wrong = "nope";
        auto attacker = *dmz::rules::ip_address::parse("127.0.0.66");
        auto other = *dmz::rules::ip_address::parse("127.0.0.1");
        dmz::rules::lockout_policy policy;
        policy.threshold = 0;  // the address limit alone
        policy.address_threshold = 3;
        for (int i = 0; i < 3; ++i) {
            std::string user = "mallory-" + std::to_string(i);
            guesses[i] = co_await a.check(user, wrong, listener, attacker, policy);
        }
        ctx.pool->try_submit([&] {
            started = true;
            g.f.wait();
        });
        while (!started) std::this_thread::yield();
        while (ctx.pool->try_submit([] {})) {
        }
        std::string user = "mallory-9";
        locked = co_await a.check(user, wrong, listener, attacker, policy);
        std::string alice = "alice";
        busy_elsewhere = co_await a.check(alice, wrong, listener, other, policy);
        g.p.set_value();
    }, asio::detached);
    io.run();
    ctx.pool->shutdown();  // join the thread still returning from the gate before the gate goes
    for (auto& r : guesses) EXPECT_EQ(r.refusal, "unknown user");
    EXPECT_FALSE(locked.ok);
    EXPECT_FALSE(locked.overloaded) << "a locked-out address must not wait for (or fill) the pool";
    EXPECT_EQ(locked.refusal, "too many failures from 127.0.0.66");
    EXPECT_TRUE(busy_elsewhere.overloaded) << "another address still needs a real check";
}

}  // namespace
