#pragma once
// A flat byte buffer with a read window, for heads and body pumps.
#include <cstring>
#include <memory>
#include <string_view>

namespace dmz::proxy {

class flat_buffer {
public:
    explicit flat_buffer(std::size_t initial = 0) { reserve(initial); }
    std::string_view data() const { return {buf_.get() + begin_, end_ - begin_}; }
    std::size_t size() const { return end_ - begin_; }
    bool empty() const { return begin_ == end_; }
    void consume(std::size_t n) {
        begin_ += n;
        if (begin_ == end_) begin_ = end_ = 0;
    }
    /// Writable space of at least `want` bytes (up to `max` total capacity when growing).
    char* prepare(std::size_t want, std::size_t& got) {
        if (cap_ - end_ < want && begin_ > 0) {
            std::memmove(buf_.get(), buf_.get() + begin_, end_ - begin_);
            end_ -= begin_;
            begin_ = 0;
        }
        if (cap_ - end_ < want) reserve(end_ + want);
        got = cap_ - end_;
        return buf_.get() + end_;
    }
    void commit(std::size_t n) { end_ += n; }
    std::size_t capacity() const { return cap_; }
    /// Gives the memory back while the connection idles (only when it is larger than
    /// `keep`: a small buffer is cheaper to keep than to allocate again per request).
    void release(std::size_t keep = 0) {
        if (empty() && cap_ > keep) {
            buf_.reset();
            cap_ = begin_ = end_ = 0;
        }
    }

private:
    void reserve(std::size_t n) {
        if (n <= cap_) return;
        std::size_t cap = cap_ ? cap_ : 4096;
        while (cap < n) cap *= 2;
        // Not zeroed: a pump writes what it reads, and untouched pages of a large buffer
        // never become resident.
        auto nb = std::make_unique_for_overwrite<char[]>(cap);
        if (end_ > begin_) std::memcpy(nb.get(), buf_.get() + begin_, end_ - begin_);
        end_ -= begin_;
        begin_ = 0;
        buf_ = std::move(nb);
        cap_ = cap;
    }
    std::unique_ptr<char[]> buf_;
    std::size_t cap_ = 0, begin_ = 0, end_ = 0;
};

}  // namespace dmz::proxy
