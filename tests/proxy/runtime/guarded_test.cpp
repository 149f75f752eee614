// No exception reaches the data plane unseen: a coroutine that throws is caught at its root,
// reported and counted, and the worker goes on.
#include <gtest/gtest.h>

#include <stdexcept>

#include "runtime.hpp"

using namespace dmz::proxy;

namespace {

TEST(SpawnGuarded, AnEscapedExceptionIsCountedAndTheWorkerGoesOn) {
    access_log log("");
    worker w(0, log, {});
    w.stats.on = true;
    bool after = false;
    spawn_guarded(w, "http session", []() -> dmz::net::task<> {
        throw std::runtime_error("a bug");
        co_return;
    });
    spawn_guarded(w, "smtp session", [&]() -> dmz::net::task<> {
        after = true;
        co_return;
    });
    testing::internal::CaptureStderr();
    w.io.run();
    auto err = testing::internal::GetCapturedStderr();
    EXPECT_TRUE(after) << "the worker runs on after the throw";
    EXPECT_NE(err.find("internal fault: an exception escaped the http session: a bug"), std::string::npos) << err;
    auto c = w.stats.snapshot();
    auto it = c.faults.find({"http", dmz::rules::fault_class::internal, dmz::rules::fault_side::tier});
    ASSERT_NE(it, c.faults.end());
    EXPECT_EQ(it->second, 1u);
    EXPECT_EQ(c.faults.size(), 1u);
}

}  // namespace
