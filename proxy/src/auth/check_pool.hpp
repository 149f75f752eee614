#pragma once
// A few threads for work too slow for an event loop (scrypt password checks, reading the
// user store), behind a bounded queue. A worker's coroutine awaits a job without blocking
// its thread, and resumes on its own executor; when the queue is full it hears so at once
// (and answers 503 overloaded) instead of queueing without end.
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "net/asio.hpp"

namespace dmz::proxy {

class check_pool {
public:
    /// `threads` run below the event loops' priority (niceness 19): a burst of password
    /// checks takes what the workers leave. A run() job that waited longer than `max_wait`
    /// (a starved machine) is answered like a full queue rather than checked late.
    check_pool(unsigned threads, std::size_t max_queued, std::chrono::milliseconds max_wait = std::chrono::seconds(5));
    ~check_pool() { shutdown(); }
    check_pool(const check_pool&) = delete;
    check_pool& operator=(const check_pool&) = delete;

    /// Queues `job`; false, and the job dropped, when `max_queued` jobs wait already.
    bool try_submit(std::function<void()> job);
    /// Drops what waits, lets running jobs finish, joins the threads. The instance calls it
    /// once its workers stopped and before they go (results are posted to their executors).
    void shutdown();
    std::size_t waiting() const;

    /// Runs `fn` (returning T) on a pool thread; the awaiting coroutine resumes on `ex` with
    /// its result, or with nullopt at once when the queue is full. An exception `fn` throws
    /// is rethrown in the coroutine.
    template <class T, class Fn>
    net::task<std::optional<T>> run(net::executor ex, Fn fn) {
        auto init = [this, ex](auto handler, Fn f) {
            using handler_type = decltype(handler);
            auto h = std::make_shared<handler_type>(std::move(handler));
            // The worker's io_context must not run out of work while its coroutine waits here.
            auto guard = std::make_shared<net::asio::executor_work_guard<net::executor>>(ex);
            bool queued = enqueue([h, guard, ex, f = std::move(f)](bool fresh) mutable {
                std::exception_ptr e;
                std::optional<T> r;
                try {
                    if (fresh) r.emplace(f());
                } catch (...) {
                    e = std::current_exception();
                }
                net::asio::post(ex, [h, e, r = std::move(r)]() mutable { (*h)(e, std::move(r)); });
                guard->reset();
            });
            if (!queued) net::asio::post(ex, [h] { (*h)(std::exception_ptr(), std::optional<T>()); });
        };
        // Named, not a temporary in the co_await (GCC 12).
        auto op = net::asio::async_initiate<decltype(net::use_task), void(std::exception_ptr, std::optional<T>)>(
            std::move(init), net::use_task, std::move(fn));
        co_return co_await std::move(op);
    }

private:
    /// A job learns whether it is still fresh (waited at most max_wait).
    using job = std::function<void(bool fresh)>;
    bool enqueue(job j);
    void work();
    mutable std::mutex m_;
    std::condition_variable cv_;
    std::deque<std::pair<job, std::chrono::steady_clock::time_point>> queue_;
    std::size_t max_queued_;
    std::chrono::milliseconds max_wait_;
    bool stopping_ = false;
    std::vector<std::thread> threads_;
};

}  // namespace dmz::proxy
